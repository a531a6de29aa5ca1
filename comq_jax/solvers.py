"""Layer solvers as immutable objects that carry every setting (optax style).

``comq(bits, ...)``, ``gptq(bits, ...)`` and ``rtn(bits, ...)`` each return a
frozen solver whose settings are checked once, when it is built. The same object
quantizes one layer (:meth:`Solver.quantize_layer`) and a whole model
(:func:`comq_jax.quantize_model`), so its settings never travel as loose options.

All three minimise (COMQ, GPTQ) or measure (round-to-nearest) the layer objective

.. math:: \\|X W - X Q\\|_F^2 = \\sum_j (w_j - q_j)^\\top H (w_j - q_j),
  \\qquad H = X^\\top X

on the grids of :func:`quant_core.grids.make_grid`, from the Gram ``H`` alone.

References:
  A. Zhang et al., "COMQ: A Backpropagation-Free Algorithm for Post-Training
  Quantization", arXiv 2403.07134 (2024); official code AozhongZhang/COMQ.
  E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers", ICLR 2023, Algorithm 1.
"""

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from comq_jax import baselines
from comq_jax import layer as layer_lib
from comq_jax import magnitude_reduction
from comq_jax import objective
from quant_core import capture
from quant_core import grids

PREPROCESS = (None, "magr")
# MagR's published alpha (A. Zhang et al., NeurIPS 2024; official code's README).
MAGR_ALPHA_CHANNEL = 1e-3
MAGR_ALPHA_GROUP = 1e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Solver:
  """A layer solver and the grid it quantizes onto (build with :func:`comq`,
  :func:`gptq` or :func:`rtn`).

  Attributes:
    bits: bit width in 2..8.
    grid: ``"asymmetric"`` (official COMQ min-max grid), ``"symmetric"``,
      ``"pow2"`` (INQ's power-of-two set), or the grids of llama.cpp's GGUF
      blocks: ``"signed"`` (Q4_0) and ``"offset"`` (Q4_1, a free min); see
      :func:`quant_core.grids.make_grid`.
    granularity: ``"channel"``, ``"group"`` (one grid per ``group_size``
      consecutive inputs of a channel) or ``"layer"`` (one per matrix).
    group_size: inputs per grid with ``granularity="group"``, else None; a last
      group of fewer inputs takes the rest. For a conv it counts inputs of its
      im2col patches.
    scalar: shrink factor λ in (0, 1] of the uniform grids (official
      ``--scalar``).
    preprocess: None, or ``"magr"``: before the solve, each matrix's weights go
      through :func:`comq_jax.magr` on the layer's Gram (one l-infinity term per
      channel, or per group with ``granularity="group"``). The solver then
      quantizes the preprocessed weights (grid included); the reported error is
      still against the original weights, ``||X W - X Q||_F``.
    magr_alpha: MagR's ``alpha``; None takes the paper's value for the
      granularity: ``1e-3`` per channel (or layer), ``1e-4`` per group.
    magr_iters: MagR's proximal steps (the paper's 200).
    scale_dtype: None, or ``"float16"``: the uniform grids' scales are float16
      values and every weight is ``scale * (code - zero_point)`` exactly, as a
      GPTQ-format checkpoint stores it (:mod:`quant_core.deploy.export_gptq`).
  """
  method: ClassVar[str] = ""

  bits: int
  grid: str = "asymmetric"
  granularity: str = "channel"
  group_size: Optional[int] = None
  scalar: float = 1.0
  preprocess: Optional[str] = None
  magr_alpha: Optional[float] = None
  magr_iters: int = 200
  scale_dtype: Optional[str] = None

  def __post_init__(self):
    grids.check_options(bits=self.bits, grid=self.grid, granularity=self.granularity,
                        scalar=self.scalar, group_size=self.group_size,
                        scale_dtype=self.scale_dtype)
    object.__setattr__(self, "scalar", float(self.scalar))
    if self.preprocess not in PREPROCESS:
      raise ValueError(f"preprocess must be one of {PREPROCESS}, got {self.preprocess!r}.")
    if self.preprocess is None and (self.magr_alpha is not None or self.magr_iters != 200):
      raise ValueError("magr_alpha and magr_iters apply only with preprocess='magr'; "
                       f"got preprocess=None with magr_alpha={self.magr_alpha!r}, "
                       f"magr_iters={self.magr_iters!r}.")
    if self.magr_alpha is not None:
      magnitude_reduction.check_alpha(self.magr_alpha)
      object.__setattr__(self, "magr_alpha", float(self.magr_alpha))
    magnitude_reduction.check_int("magr_iters", self.magr_iters)
    object.__setattr__(self, "magr_iters", int(self.magr_iters))

  def magr_settings(self) -> Optional[dict]:
    """``alpha``, ``iters`` and ``group_size`` of :func:`comq_jax.magr` as this
    solver applies it, or None without ``preprocess="magr"``."""
    if self.preprocess != "magr":
      return None
    grouped = self.granularity == "group"
    alpha = self.magr_alpha
    if alpha is None:
      alpha = MAGR_ALPHA_GROUP if grouped else MAGR_ALPHA_CHANNEL
    return dict(alpha=alpha, iters=self.magr_iters,
                group_size=self.group_size if grouped else None)

  def preprocessed(self, wt, gram):
    """The channel-major weights the solve quantizes: ``wt`` itself, or after MagR
    (traced; ``gram`` float, ``(d_in, d_in)``)."""
    settings = self.magr_settings()
    if settings is None:
      return wt
    alpha = jnp.asarray(settings.pop("alpha"), wt.dtype)
    return magnitude_reduction.solve_channel_major(wt, gram.astype(wt.dtype), alpha,
                                                   **settings)

  def grid_options(self) -> dict:
    """The grid settings, as :func:`quant_core.grids.make_grid` takes them."""
    return dict(bits=self.bits, grid=self.grid, granularity=self.granularity,
                scalar=self.scalar, group_size=self.group_size,
                scale_dtype=self.scale_dtype)

  def settings(self) -> dict:
    """Every setting, with ``method``: plain values (e.g. for a JSON record)."""
    return dict(dataclasses.asdict(self), method=self.method)

  def solve(self, wt, gram, split=None):
    """The traced solve of one matrix in channel-major layout, after the
    preprocessing (``preprocess``).

    Args:
      wt: ``(d_out, d_in)`` weights in the compute dtype.
      gram: ``(d_in, d_in)`` float Gram.
      split: a mesh whose devices share the channels (COMQ only), or None.

    Returns:
      ``(qt, codes_t, grid, error, history, positive_definite)``: ``error``
      against ``wt``; ``history`` is empty but for COMQ (where it measures the
      sweeps against the preprocessed weights).
    """
    target = self.preprocessed(wt, gram)
    qt, codes, g, error, history, positive = self.solve_weights(target, gram, split)
    return qt, codes, g, self._original_error(wt, qt, gram, error), history, positive

  def solve_weights(self, wt, gram, split=None):
    """The solve proper of :meth:`solve`, on already preprocessed weights."""
    raise NotImplementedError

  def _original_error(self, wt, qt, gram, error):
    """The error against the original weights: the solver's own, unless the
    weights were preprocessed."""
    if self.preprocess is None:
      return error
    return objective.reconstruction_error(wt.T, qt.T, gram.astype(wt.dtype))

  def quantize_layer(self, w, x=None, *, gram=None) -> grids.LayerQuantization:
    """Quantizes one linear layer's weights.

    Args:
      w: ``(d_in, d_out)`` weights (Flax layout).
      x: ``(N, d_in)`` calibration inputs; or give ``gram`` instead.
      gram: ``(d_in, d_in)`` ``X^T X``, e.g. from
        :func:`quant_core.capture.accumulate_gram`.

    Returns:
      A :class:`quant_core.grids.LayerQuantization` recording its ``bits``,
      ``grid`` and ``group_size``.

    Raises:
      ValueError: bad shapes, neither or both of ``x``/``gram`` (round-to-nearest
        needs neither), or (for concrete inputs) NaN/inf values.
    """
    w, gram = self._inputs(w, x, gram, needs_data=True)
    return self.layer_result(w, *self.solve(self._channel_major(w), gram)[:5])

  def _inputs(self, w, x, gram, *, needs_data):
    w = jnp.asarray(w)
    gram = objective.check_layer_inputs(w, x, gram)
    if gram is None and needs_data:
      raise ValueError(f"{type(self).__name__}.quantize_layer needs calibration data: "
                       "x or gram.")
    return w, gram

  @staticmethod
  def _channel_major(w):
    return w.T.astype(objective.compute_dtype(w.dtype))

  def layer_result(self, w, qt, codes, g, error, history=None):
    """The :class:`quant_core.grids.LayerQuantization` of channel-major solver outputs,
    recording this solver's grid."""
    history = jnp.zeros((0,), qt.dtype) if history is None else history
    return objective.layer_result(w, qt, codes, g, error, history,
                                  group_size=self.group_size, bits=self.bits,
                                  grid=self.grid)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(Solver):
  """Round-to-nearest on the solver grid; see :func:`rtn`."""
  method: ClassVar[str] = "rtn"

  def solve_weights(self, wt, gram, split=None):
    del split
    qt, codes, g = baselines.rtn_solve(wt, **self.grid_options())
    error = objective.reconstruction_error(wt.T, qt.T, gram.astype(wt.dtype))
    return qt, codes, g, error, jnp.zeros((0,), wt.dtype), jnp.asarray(True)

  def quantize_layer(self, w, x=None, *, gram=None) -> grids.LayerQuantization:
    """As :meth:`Solver.quantize_layer`; the data are optional (they only give
    ``error``, None without them) unless ``preprocess`` needs them."""
    w, gram = self._inputs(w, x, gram, needs_data=self.preprocess is not None)
    if self.preprocess is not None:
      return self.layer_result(w, *self.solve(self._channel_major(w), gram)[:4])
    wt = self._channel_major(w)
    qt, codes, g = baselines.rtn_solve(wt, **self.grid_options())
    error = None if gram is None else objective.reconstruction_error(
        wt.T, qt.T, gram.astype(wt.dtype))
    return self.layer_result(w, qt, codes, g, error)


@dataclasses.dataclass(frozen=True, kw_only=True)
class COMQ(Solver):
  """COMQ coordinate descent; see :func:`comq`."""
  method: ClassVar[str] = "comq"

  iters: int = 1
  order: str = "greedy"
  scale_update: bool = False
  init: str = "float"

  def __post_init__(self):
    super().__post_init__()
    layer_lib.check_options(iters=self.iters, order=self.order, init=self.init)
    object.__setattr__(self, "scale_update", bool(self.scale_update))

  def _options(self) -> dict:
    return dict(self.grid_options(), iters=self.iters, order=self.order,
                scale_update=self.scale_update, init=self.init)

  def solve_weights(self, wt, gram, split=None):
    devices = {} if split is None else dict(axes=split.axis_names,
                                            devices=split.devices.size)
    qt, codes, g, error, history = layer_lib.solve_on_devices(wt, gram, **self._options(),
                                                              **devices)
    return qt, codes, g, error, history, jnp.asarray(True)

  def quantize_layer(self, w, x=None, *, gram=None,
                     mesh: Optional[jax.sharding.Mesh] = None) -> grids.LayerQuantization:
    """As :meth:`Solver.quantize_layer`, optionally with the output channels
    split over the devices of ``mesh`` (results bitwise equal to one device;
    see :func:`comq`)."""
    capture.check_mesh(mesh)
    w, gram = self._inputs(w, x, gram, needs_data=True)
    wt = self._channel_major(w)
    qt, codes, g, error, history = layer_lib.solve(self.preprocessed(wt, gram), gram,
                                                   **self._options(), mesh=mesh)
    error = self._original_error(wt, qt, gram, error)
    return self.layer_result(w, qt, codes, g, error, history)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(Solver):
  """GPTQ with lazy block updates; see :func:`gptq`."""
  method: ClassVar[str] = "gptq"

  block_size: int = 128
  damp: float = 0.01
  act_order: bool = False
  static_groups: bool = False

  def __post_init__(self):
    super().__post_init__()
    baselines.check_gptq_options(granularity=self.granularity, block_size=self.block_size,
                                 damp=self.damp, act_order=self.act_order,
                                 static_groups=self.static_groups)
    for name, cast in (("damp", float), ("act_order", bool), ("static_groups", bool)):
      object.__setattr__(self, name, cast(getattr(self, name)))

  def solve_weights(self, wt, gram, split=None):
    del split
    qt, codes, g, error, positive_definite = baselines.gptq_solve(
        wt, gram, **self.grid_options(), block_size=self.block_size, damp=self.damp,
        act_order=self.act_order, static_groups=self.static_groups)
    return qt, codes, g, error, jnp.zeros((0,), wt.dtype), positive_definite

  def quantize_layer(self, w, x=None, *, gram=None) -> grids.LayerQuantization:
    """As :meth:`Solver.quantize_layer`. Not for use under ``jax.jit``: one
    jitted call checks the inputs and solves, and returns beside the result
    whether ``w`` and the data were finite and the damped ``H`` positive
    definite; one host read of those flags after the call raises on NaN/inf
    inputs, or (saying to raise ``damp``) instead of returning NaN weights."""
    result, flags = _gptq_layer(self, w, x, gram)
    w_finite, data_finite, positive_definite = jax.device_get(flags)
    if not w_finite:
      raise ValueError("w contains NaN or inf values.")
    if not data_finite:
      raise ValueError(f"{'gram' if x is None else 'x'} contains NaN or inf values.")
    if not positive_definite:
      raise ValueError(f"H is not positive definite after damping with damp={self.damp}; "
                       "raise damp, or check the calibration data.")
    return result


@functools.partial(jax.jit, static_argnums=0)
def _gptq_layer(solver: GPTQ, w, x, gram):
  """:meth:`GPTQ.quantize_layer`'s checks and solve in one jitted call.

  Under the trace only shapes and dtypes are checked (the value checks of
  :func:`comq_jax.objective.check_layer_inputs` skip tracers); finiteness is
  computed here, on the device, and returned with the solve's flag.

  Returns:
    ``(result, flags)``: a :class:`quant_core.grids.LayerQuantization` and the
    booleans ``(w finite, x or gram finite, damped H positive definite)``.
  """
  data = gram if x is None else x
  w, gram = solver._inputs(w, x, gram, needs_data=True)
  finite = lambda a: jnp.all(jnp.isfinite(a))
  qt, codes, g, error, _, positive_definite = solver.solve(solver._channel_major(w), gram)
  flags = (finite(w), finite(jnp.asarray(data)), positive_definite)
  return solver.layer_result(w, qt, codes, g, error), flags


def rtn(bits: int, *, grid: str = "asymmetric", granularity: str = "channel",
        group_size: Optional[int] = None, scalar: float = 1.0,
        preprocess: Optional[str] = None, magr_alpha: Optional[float] = None,
        magr_iters: int = 200, scale_dtype: Optional[str] = None) -> RTN:
  """Round-to-nearest: every weight to its nearest grid value.

  .. math:: q_{ji} = \\Pi_{G_j}(w_{ji})

  The data-free baseline; calibration data, where given, only measure the error.

  Args:
    bits, grid, granularity, group_size, scalar, scale_dtype: the grid
      (:class:`Solver`).
    preprocess, magr_alpha, magr_iters: MagR before rounding (:class:`Solver`).

  Returns:
    An :class:`RTN` solver.

  Raises:
    ValueError: a setting outside its range (the message names it and what is
      allowed).
  """
  return RTN(bits=bits, grid=grid, granularity=granularity, group_size=group_size,
             scalar=scalar, preprocess=preprocess, magr_alpha=magr_alpha,
             magr_iters=magr_iters, scale_dtype=scale_dtype)


def comq(bits: int, *, iters: int = 1, order: str = "greedy", scale_update: bool = False,
         scalar: float = 1.0, grid: str = "asymmetric", granularity: str = "channel",
         group_size: Optional[int] = None, init: str = "float",
         preprocess: Optional[str] = None, magr_alpha: Optional[float] = None,
         magr_iters: int = 200, scale_dtype: Optional[str] = None) -> COMQ:
  """COMQ: coordinate descent over the integer codes (and optionally the scales).

  Output channels are independent for a fixed scale. Starting from ``Q = W``
  (so the first sweep is GPFQ-like), each of ``iters`` sweeps visits every input
  coordinate once per channel, in the channel's own order, and sets it to the
  exact 1-D minimiser on the grid:

  .. math::

    q_{ji} \\leftarrow \\Pi_{G_j}\\Big(w_{ji} + \\frac{[H(w_j - q_j)]_i
        - H_{ii}(w_{ji} - q_{ji})}{H_{ii}}\\Big)

  (nearest grid point; ties to the lower value). ``order="greedy"`` visits
  coordinates by descending ``sqrt(H_ii) |w_ji|`` computed once from ``W``
  (official code), a different order per channel, so a sweep reads one Gram row
  per channel and step (memory-bound on large layers). ``"cyclic"`` (``0..d_in-1``)
  and ``"diag"`` (by descending ``H_ii``: GPTQ's act-order permutation, with static
  groups, since every group keeps the grid made from ``W`` before the sweep) share
  one order over all channels, so each block of a sweep updates the residual with
  one matrix product. With ``scale_update=True``
  each sweep is followed by the paper's closed-form scale step (least squares in
  ``δ_j``, or one ``δ`` for ``granularity="layer"``; with groups, one exact step
  per group in turn), which the official code omits. No step can raise the
  objective. The defaults reproduce the official code.

  ``init="gptq"`` starts the sweeps from GPTQ's solution on the same grid (the
  default :func:`gptq` options, static groups) instead of from ``W``, and
  ``init="gptq-act-order"`` from GPTQ's with ``act_order=True`` (static groups):
  since no sweep raises the objective, the result is never worse than that GPTQ's. (Where
  ``H`` is not positive definite even after GPTQ's damping, the sweeps start
  from ``W``.)

  Guards: an input with ``H_ii = 0`` (dead feature) is rounded to nearest; a
  constant weight channel is represented exactly (see ``make_grid``).

  With a mesh (:meth:`COMQ.quantize_layer`, or ``quantize_model``'s) the output
  channels are split evenly over all its devices (``d_out`` padded to a multiple
  of the device count and of a chunk of up to 64 channels, the padding dropped).
  Each channel computes exactly what it computes without a mesh: the grid (its
  per-layer reduction included) comes from the whole layer before the split,
  matrix products run over the same fixed chunks of channels either way, and the
  per-layer scale step and the errors gather the per-channel sums and add them in
  one order, so every field of the result is bitwise equal to the call without a
  mesh on the same backend. ``init="gptq"`` computes its starting point on the
  whole layer before the split.

  Args:
    bits: bit width in 2..8.
    iters: number of sweeps ``K >= 1``.
    order: ``"greedy"``, ``"cyclic"`` or ``"diag"``.
    scale_update: alternate sweeps with least-squares scale updates.
    scalar, grid, granularity, group_size, scale_dtype: the grid (:class:`Solver`).
    init: ``"float"`` (start from ``W``, official), ``"gptq"`` or
      ``"gptq-act-order"``.
    preprocess, magr_alpha, magr_iters: MagR before the sweeps (:class:`Solver`);
      with ``init="gptq"``, GPTQ's start is computed on the preprocessed weights.

  Returns:
    A :class:`COMQ` solver; its ``history`` (in each result) holds the error
    after each sweep and, with ``scale_update``, after each scale update.

  Raises:
    ValueError: a setting outside its range.

  Example:
    >>> import jax, comq_jax
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))
    >>> result = comq_jax.comq(bits=4, iters=3).quantize_layer(w, x)
    >>> result.bits, result.grid, result.codes.shape
    (4, 'asymmetric', (16, 8))
    >>> bool(result.history[-1] <= result.history[0])  # no sweep raises the error
    True
  """
  return COMQ(bits=bits, iters=iters, order=order, scale_update=scale_update,
              scalar=scalar, grid=grid, granularity=granularity, group_size=group_size,
              init=init, preprocess=preprocess, magr_alpha=magr_alpha,
              magr_iters=magr_iters, scale_dtype=scale_dtype)


def gptq(bits: int, *, grid: str = "asymmetric", granularity: str = "channel",
         group_size: Optional[int] = None, scalar: float = 1.0, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
         preprocess: Optional[str] = None, magr_alpha: Optional[float] = None,
         magr_iters: int = 200, scale_dtype: Optional[str] = None) -> GPTQ:
  """GPTQ: quantizes one input after another, pushing each error onto the rest.

  With ``H = X^T X + λ I`` (``λ = damp · mean(diag H)``) and ``U`` the upper
  Cholesky factor of ``H^{-1}``, input ``i`` of every channel is rounded to the
  grid and the remaining inputs absorb its error:

  .. math::

    q_{:,i} = \\Pi(w_{:,i}), \\qquad
    w_{:,k} \\leftarrow w_{:,k} - \\frac{w_{:,i} - q_{:,i}}{U_{ii}}\\, U_{ik}
    \\quad (k > i).

  The updates run lazily in blocks of ``block_size`` inputs: inside a block column
  by column, then one matrix product for every later input (Frantar et al.,
  Sec. 3, "lazy batch updates"). ``act_order`` visits the inputs by decreasing
  ``H_ii``. The grid is :func:`quant_core.grids.make_grid`'s, from the original
  weights, except for group-wise grids without ``static_groups``: then each
  group's grid comes from the updated weights when its first input is reached, as
  in the paper's code. With groups the block size is rounded to a multiple of
  ``group_size``, so that a group is never split between blocks.

  It quantizes onto COMQ's grid exactly (the paper's code widens each min-max
  range to include 0; this one does not, so GPTQ, COMQ and round-to-nearest share
  one grid). Dead inputs (``H_ii = 0``) carry no error: they are rounded to
  nearest, as COMQ does (the paper's code zeroes them instead). An ``H`` that is
  not positive definite after damping is an error that says to raise ``damp``.

  Args:
    bits, grid, granularity, group_size, scalar, scale_dtype: the grid
      (:class:`Solver`).
    block_size: inputs per lazy block, >= 1.
    damp: dampening, a fraction in (0, 1) of the mean diagonal of ``H``.
    act_order: visit inputs by decreasing ``H_ii``.
    static_groups: group grids from the original weights (needed with
      ``act_order`` and groups).
    preprocess, magr_alpha, magr_iters: MagR before GPTQ (:class:`Solver`), as
      the paper's MagR+OPTQ.

  Returns:
    A :class:`GPTQ` solver.

  Raises:
    ValueError: a setting outside its range.
  """
  return GPTQ(bits=bits, grid=grid, granularity=granularity, group_size=group_size,
              scalar=scalar, block_size=block_size, damp=damp, act_order=act_order,
              static_groups=static_groups, preprocess=preprocess, magr_alpha=magr_alpha,
              magr_iters=magr_iters, scale_dtype=scale_dtype)


SOLVERS = {"comq": comq, "gptq": gptq, "rtn": rtn}


def from_settings(settings: dict) -> Solver:
  """The solver of a :meth:`Solver.settings` dict (e.g. read back from a record)."""
  settings = dict(settings)
  method = settings.pop("method", None)
  if method not in SOLVERS:
    raise ValueError(f"settings['method'] must be one of {tuple(SOLVERS)}, got "
                     f"{method!r}.")
  return SOLVERS[method](**settings)
