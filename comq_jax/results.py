"""What :func:`comq_jax.quantize_model` returns: the model, per-layer reports with
their codes, the layers left in float, and where the time went."""

from typing import Any, NamedTuple, Optional

from comq_jax import solvers
from quant_core import grids
from quant_core import layers
from quant_core.deploy import sizes

PyTree = Any


class LayerReport(NamedTuple):
  """One quantized layer.

  Attributes:
    path: the ``/``-joined module path.
    shape: the kernel's shape.
    bits: the bit width of its grid.
    error: the solver's ``||X W - X W_q||_F`` (over all its feature groups).
    rtn_error: round-to-nearest's on the same grid.
    seconds: solve time (compilation excluded).
    matrices: ``(groups, d_in, d_out)`` of its 2-D view (:mod:`quant_core.layers`).
    solver: the :class:`comq_jax.solvers.Solver` that quantized it (None in a
      report rebuilt from a record without it).
    quantization: the solver's codes and grid as it produced them, scale updates
      included: a :class:`quant_core.grids.LayerQuantization` whose arrays carry
      a leading ``groups`` axis (host numpy arrays); None in a rebuilt report.
    view: the layer's 2-D view (:data:`quant_core.layers.LinearView`), to lay the
      codes out as its kernel; None in a rebuilt report.
  """
  path: str
  shape: tuple
  bits: int
  error: float
  rtn_error: float
  seconds: float
  matrices: tuple
  solver: Optional[solvers.Solver] = None
  quantization: Optional[grids.LayerQuantization] = None
  view: Any = None

  @property
  def group_size(self) -> Optional[int]:
    """Inputs per scale as used: the solver's ``group_size``, or ``d_in`` when
    the layer has fewer inputs (one group, i.e. per channel); None without
    groups."""
    if self.solver is None or self.solver.group_size is None:
      return None
    return min(self.solver.group_size, self.matrices[1])

  @classmethod
  def from_record(cls, record: dict, solver=None) -> "LayerReport":
    """The report rebuilt from :meth:`record` (without codes); ``group_size`` is
    derived, so it is not read back."""
    fields = {key: record[key] for key in ("path", "bits", "error", "rtn_error",
                                           "seconds")}
    return cls(**fields, shape=tuple(record["shape"]), matrices=tuple(record["matrices"]),
               solver=solver)

  def record(self) -> dict:
    """The report as JSON types (the codes left out; the solver as its settings)."""
    return dict(path=self.path, shape=list(self.shape), bits=self.bits,
                error=self.error, rtn_error=self.rtn_error, seconds=self.seconds,
                matrices=list(self.matrices), group_size=self.group_size)


class SkippedLayer(NamedTuple):
  """A linear layer left in float: its path, kind (e.g. ``"nn.ConvTranspose"``)
  and why (a rule that maps it to None, an unsupported configuration, no
  calibration rows, or never called on the calibration batches)."""
  path: str
  kind: str
  reason: str


class Timings(NamedTuple):
  """Where :func:`quantize_model` spent its time (seconds), and its programs' memory.

  Attributes:
    capture_seconds: forward passes accumulating the Grams (compilation
      excluded).
    compile_seconds: compiling the capture and the solves, summed over the
      background threads that compile them (it overlaps the other phases).
    compile_wait_seconds: wall time spent waiting for compilations (capture
      and solves).
    solve_seconds: wall time after planning less ``capture_seconds``: the
      solves, waits for their compilation included (with ``inputs="fp"`` two
      layers solve at a time).
    compilations: XLA compilations during the call (``jax.monitoring``):
      one capture step per batch (or microbatch step) signature (per layer with
      ``inputs="sequential"``), one solve per distinct layer signature and
      solver, and any small program not already cached by an earlier call.
    program_bytes: memory, not time: for ``"capture"`` and ``"solve"`` (and
      with ``blocks``, ``"block inputs"`` and ``"propagate"``, the programs that
      capture a block's inputs from the model and run a block), the bytes of
      the largest such program's buffers (arguments, outputs and temporaries,
      less outputs written over donated arguments) as XLA assigns them, i.e.
      what it holds on the device while it runs; empty where the backend does
      not report it.
  """
  capture_seconds: float
  compile_seconds: float
  compile_wait_seconds: float
  solve_seconds: float
  compilations: int
  program_bytes: dict


class ModelQuantization(NamedTuple):
  """Result of :func:`quantize_model`: the model and what was done to it.

  Attributes:
    variables: the variables with quantized kernels (same tree, shapes and
      dtypes as the input). For an NNX model: ``{"params": ...}``, the pure
      dict of its ``nnx.Param`` state.
    layers: one :class:`LayerReport` per quantized layer, in forward order; each
      holds its solver and its codes.
    skipped: one :class:`SkippedLayer` per linear layer left in float.
    inputs: ``"fp"`` or ``"sequential"``, as passed.
    timings: a :class:`Timings`, or None (e.g. for a result rebuilt from a
      record).
    model: for an NNX model, a new module with the quantized weights (the
      given module is not changed); None for linen.
  """
  variables: PyTree
  layers: list
  skipped: list
  inputs: str = "fp"
  timings: Optional[Timings] = None
  model: Any = None

  def quantized_mask(self) -> PyTree:
    """Bool pytree over ``variables["params"]``: the quantized kernels."""
    return layers.kernel_mask(self.variables["params"],
                              [report.path for report in self.layers])

  def size_report(self) -> sizes.SizeReport:
    """Bytes of the model with its quantized kernels stored as codes
    (:func:`quant_core.deploy.sizes.quantized_kernel_bytes`, from each layer's
    solver and 2-D view; every other leaf in its own dtype)."""
    kernel_bytes = {}
    for report in self.layers:
      if report.solver is None:
        raise ValueError(f"{report.path}: the report has no solver, so its grid is "
                         "unknown; rebuild it with its solver.")
      solver = report.solver
      kernel_bytes[report.path] = sizes.quantized_kernel_bytes(
          report.matrices, bits=solver.bits, grid=solver.grid,
          granularity=solver.granularity, group_size=solver.group_size)
    return sizes.variables_size_report(self.variables, kernel_bytes)
