"""Solving a model's layers from their Grams, and writing the results back.

Solves are compiled once per distinct layer signature and solver (in background
threads, see :class:`quant_core.programs.Programs`); independent layers are
solved two at a time, each on one core; results are written back, reported and
logged in layer order.
"""

import collections
import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np

from comq_jax import objective
from comq_jax import solvers
from comq_jax.results import LayerReport
from comq_jax.results import SkippedLayer
from quant_core import paths
from quant_core import programs as programs_lib

# Layers solved at a time when they are independent (inputs="fp"): one solve
# keeps one core busy.
SOLVES_IN_FLIGHT = 2

# Feature groups solved per call: grouped and depthwise convs of any width share
# one compiled solve per matrix shape.
_GROUP_CHUNK = 32


def _solve_shapes(view, kernel_dtype):
  """Shapes of one call of a layer's solve: ``(mats, gram)`` of a group chunk."""
  groups = 1 if view.groups == 1 else _GROUP_CHUNK
  return (jax.ShapeDtypeStruct((groups, view.d_in, view.d_out),
                               objective.compute_dtype(kernel_dtype)),
          jax.ShapeDtypeStruct((groups, view.d_in, view.d_in), jnp.float32))


def _solve_fn(solver, mesh=None):
  """``(mats, gram) -> (result, RTN errors, positive definite)`` for ``mats`` of
  shape ``(groups, d_in, d_out)`` and Grams ``(groups, d_in, d_in)``: ``result``
  a :class:`quant_core.grids.LayerQuantization` whose arrays carry the groups
  axis.

  With a mesh the program runs on every device of it (``jax.shard_map``, inputs
  and outputs replicated), so every device computes exactly what one device
  computes without a mesh, except that COMQ solves of a single matrix split
  its channels over the devices (:func:`comq_jax.layer.solve_on_devices`);
  grouped convs, GPTQ and RTN are computed whole on every device."""
  baseline = solvers.rtn(solver.bits, grid=solver.grid, granularity=solver.granularity,
                         group_size=solver.group_size, scalar=solver.scalar,
                         scale_dtype=solver.scale_dtype)

  def over_groups(fn, mats, gram, split=None):
    # A single matrix skips vmap: tracing its batching rules costs as much as
    # tracing the solve. Only it is split over the mesh.
    if mats.shape[0] == 1:
      return jax.tree.map(lambda a: a[None], fn(mats[0], gram[0], split))
    return jax.vmap(lambda w, h: fn(w, h, None))(mats, gram)

  def solve_with(chosen):
    def one(w, h, split):
      qt, codes, g, error, history, positive = chosen.solve(w.T, h, split)
      return chosen.layer_result(w, qt, codes, g, error, history), positive
    return one

  def solve(mats, gram):
    rtn, _ = over_groups(solve_with(baseline), mats, gram)
    if isinstance(solver, solvers.RTN) and solver.preprocess is None:
      return rtn, rtn.error, jnp.asarray(True)
    result, positive = over_groups(solve_with(solver), mats, gram, mesh)
    return result, rtn.error, jnp.all(positive)

  if mesh is None:
    return solve
  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(solve, mesh=mesh, in_specs=replicated, out_specs=replicated,
                       check_vma=False)


def _group_chunks(mats, gram):
  """``[(mats, gram), ...]``: one chunk for a single matrix, else chunks of
  ``_GROUP_CHUNK`` groups, the last filled with copies of group 0 (independent
  problems, whose results are dropped)."""
  groups = mats.shape[0]
  if groups == 1:
    # The device's Gram as it is: no host copy of the largest array of the solve.
    return [(mats, gram)]
  gram = np.asarray(gram)
  pad = -groups % _GROUP_CHUNK
  fill = lambda a: np.concatenate([a, np.broadcast_to(a[:1], (pad,) + a.shape[1:])])
  mats, gram = fill(mats), fill(gram)
  return [(mats[i:i + _GROUP_CHUNK], gram[i:i + _GROUP_CHUNK])
          for i in range(0, len(mats), _GROUP_CHUNK)]


class LayerSolves:
  """A queue of layer solves: ``submit`` a layer with its Gram, ``drain`` to wait
  for every solve submitted and write it back into ``params``.

  Args:
    params: the parameter tree (nested dicts) written into.
    programs: a :class:`quant_core.programs.Programs`.
    mesh: optional mesh, see :func:`_solve_fn`.
    in_flight: solves at a time (1 when each layer's inputs depend on the last).
    bar: a :class:`quant_core.progress.LayerProgress`.
    total: layers to quantize, for the log lines.
    masked: whether row masks were given (a layer without rows is then an error).
    log: the logger of skipped layers.
  """

  def __init__(self, params, programs, mesh, in_flight, bar, total, masked, log):
    self.params = params
    self.reports = []
    self.skipped = []
    self._programs = programs
    self._mesh = mesh
    self._fns = {}
    self._in_flight = in_flight
    self._bar = bar
    self._total = total
    self._masked = masked
    self._log = log
    self._pending = collections.deque()
    self._pool = concurrent.futures.ThreadPoolExecutor(in_flight)
    self._index = 0

  def _program(self, layer_solver, args):
    if layer_solver not in self._fns:
      self._fns[layer_solver] = _solve_fn(layer_solver, self._mesh)
    key = ("solve", layer_solver) + programs_lib.signature(*args)
    return key, self._fns[layer_solver]

  def compile_ahead(self, layer, layer_solver):
    """Starts compiling the layer's solve."""
    shapes = _solve_shapes(layer.view, paths.get(self.params, layer.path)["kernel"].dtype)
    self._programs.submit(*self._program(layer_solver, shapes), *shapes)

  def _run(self, layer_solver, chunks):
    """``(outputs per chunk, seconds)``, compilation wait excluded."""
    key, fn = self._program(layer_solver, chunks[0])
    program = self._programs.get(key, fn, *chunks[0])
    start = time.perf_counter()
    outs = jax.device_get([program(*chunk) for chunk in chunks])
    return outs, time.perf_counter() - start

  def submit(self, layer, layer_solver, gram, count) -> None:
    """Queues the solve of ``layer`` from its Gram (``count`` rows)."""
    name = paths.path_name(layer.path)
    index = self._index
    self._index += 1
    if float(count) == 0:
      if self._masked:
        raise ValueError(f"{name}: the row masks cover zero of its calibration "
                         f"rows; every quantized layer needs at least one unmasked "
                         f"row.")
      self.skipped.append(SkippedLayer(name, layer.kind, "no calibration rows"))
      self._log.warning("%s (%s) left in float: no calibration rows", name, layer.kind)
      return
    kernel = paths.get(self.params, layer.path)["kernel"]
    # Reshapes on the host: eager device ops would compile once per shape.
    mats = layer.view.matrices(np.asarray(kernel)).astype(
        objective.compute_dtype(kernel.dtype))
    # On a mesh, solves take host Grams (their programs' inputs are unsharded).
    chunks = _group_chunks(mats, gram if self._mesh is None else np.asarray(gram))
    self._pending.append((index, layer, layer_solver, len(mats),
                          self._pool.submit(self._run, layer_solver, chunks)))
    if len(self._pending) >= self._in_flight:
      self._finish(*self._pending.popleft())

  def drain(self) -> None:
    """Waits for every queued solve and writes it back."""
    while self._pending:
      self._finish(*self._pending.popleft())

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)

  def _finish(self, index, layer, layer_solver, groups, solved):
    name = paths.path_name(layer.path)
    outs, seconds = solved.result()
    result, rtn_err = jax.tree.map(lambda *parts: np.concatenate(parts)[:groups],
                                   *[out[:2] for out in outs])
    if not np.all(np.isfinite(rtn_err)):
      raise ValueError(
          f"{name}: its calibration inputs hold NaN or inf although the calibration "
          f"batches are finite: the model produces them before this layer (e.g. an "
          f"overflow in a low-precision dtype).")
    if not all(out[2] for out in outs):
      raise ValueError(f"{name}: H is not positive definite after damping with "
                       f"damp={layer_solver.damp}; raise damp.")
    leaf = paths.get(self.params, layer.path)
    kernel = leaf["kernel"]
    new_kernel = layer.view.kernel(result.weights).astype(kernel.dtype)
    # Host kernels stay on the host (a model larger than the device); device_put, since
    # jnp.asarray would compile a staging program per shape.
    leaf["kernel"] = new_kernel if isinstance(kernel, np.ndarray) else jax.device_put(new_kernel)
    total = lambda e: float(np.sqrt(np.sum(np.square(e, dtype=np.float64))))
    report = LayerReport(
        path=name, shape=tuple(kernel.shape), bits=layer_solver.bits,
        error=total(result.error), rtn_error=total(rtn_err), seconds=seconds,
        matrices=(layer.view.groups, layer.view.d_in, layer.view.d_out),
        solver=layer_solver, quantization=result, view=layer.view)
    self.reports.append(report)
    self._bar.layer_done("%s %d/%d %s %s: error %.4g (RTN %.4g), %.2fs",
                         layer_solver.method.upper(), index + 1, self._total, name,
                         tuple(kernel.shape), report.error, report.rtn_error, seconds,
                         label=f"{name} error {report.error:.4g} (RTN {report.rtn_error:.4g})")
