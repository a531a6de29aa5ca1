"""Post-training quantization of a whole Flax model (linen or NNX), layer by layer.

Layers and their input Grams come from :mod:`quant_core.capture` (interception:
the model is not rewritten); each layer is then solved by its solver
(:mod:`comq_jax.solvers`, chosen by :mod:`comq_jax.rules`). Solves are compiled
once per distinct layer signature and solver, in background threads while the
Grams are captured, so repeated blocks share one compilation. Given a mesh, the
forward passes are data-parallel over its ``"batch"`` axis and COMQ solves split
output channels over its devices, with results bitwise equal to one device.

Reference: Zhang et al., arXiv 2403.07134 (2024). The official code quantizes
``nn.Linear`` layers one by one from inputs of the full-precision model; conv
layers use the standard im2col reduction (each group of a grouped conv is an
independent linear layer).
"""

import collections
import concurrent.futures
import logging
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comq_jax import objective
from comq_jax import rules as rules_lib
from comq_jax import solvers
from comq_jax.results import LayerReport
from comq_jax.results import ModelQuantization
from comq_jax.results import SkippedLayer
from comq_jax.results import Timings
from quant_core import capture
from quant_core import layers
from quant_core import paths
from quant_core import programs as programs_lib
from quant_core import progress as progress_lib

INPUTS = ("fp", "sequential")
ON_UNSUPPORTED = ("error", "skip")

_LOG = logging.getLogger(__name__)

# Layers solved at a time when they are independent (inputs="fp"): one solve
# keeps one core busy.
_SOLVES_IN_FLIGHT = 2

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
                         group_size=solver.group_size, scalar=solver.scalar)

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
    if isinstance(solver, solvers.RTN):
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


def _check_call(solver, inputs, on_unsupported, progress):
  progress_lib.check_enabled(progress)
  if not isinstance(solver, solvers.Solver):
    raise ValueError("solver must be built by comq_jax.comq, comq_jax.gptq or "
                     f"comq_jax.rtn, got {type(solver).__name__}.")
  if inputs not in INPUTS:
    raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}.")
  if on_unsupported not in ON_UNSUPPORTED:
    raise ValueError(f"on_unsupported must be one of {ON_UNSUPPORTED}, got "
                     f"{on_unsupported!r}.")


def quantize_model(model_or_apply: Any, variables, calibration_batches: Sequence[Any],
                   solver: solvers.Solver, *, rules=None,
                   row_masks: Optional[Sequence[Any]] = None,
                   on_unsupported: str = "error", inputs: str = "fp",
                   mesh: Optional[jax.sharding.Mesh] = None,
                   microbatch: Optional[int] = None, progress: bool = False,
                   **apply_kwargs) -> ModelQuantization:
  """Quantizes every linear layer of a Flax model (linen or NNX).

  The layer kinds and their 2-D views are those of :mod:`quant_core.layers`:
  Dense/Linear, DenseGeneral/LinearGeneral, Einsum and Conv (grouped and
  depthwise included), subclasses too. They are found by interception (the
  model is not rewritten). For each layer the Gram ``H = X^T X`` of its input
  rows is accumulated over all calibration batches by one jitted forward
  pass per batch, and every matrix of the layer (one per conv feature group)
  is solved by the layer's solver: ``solver``, or the first of ``rules`` whose
  pattern matches the layer's path (:mod:`comq_jax.rules`):

  * :func:`comq_jax.comq`: coordinate descent;
  * :func:`comq_jax.gptq`: on the same Grams and grid;
  * :func:`comq_jax.rtn`: round-to-nearest on the same grid (the data only
    measure the error).

  Every report keeps the solver's codes and grid (scale updates included), so
  packing the result (:func:`quant_core.deploy.pack_quantization`) re-lays
  them out with nothing recovered from float values.

  Biases, normalisation parameters, embeddings and batch statistics are left
  in float. Every ``kernel`` that is not quantized is listed in the result's
  ``skipped`` with the reason.

  * ``inputs="fp"`` (official code): inputs come from the full-precision
    model, one pass over the batches captures every layer.
  * ``inputs="sequential"``: layer ``l`` sees inputs from the model whose
    layers before ``l`` are already quantized (one pass per layer); the target
    is then ``X_q W`` with those inputs.

  Calibration streams: the batches are read one at a time (a lazy
  ``Sequence`` is never copied; with ``"sequential"`` it is read once per
  layer), and only the running Grams stay between batches, never the
  activations.

  **Microbatches and meshes.** Each batch is cut into microbatches of
  ``microbatch`` examples (the whole batch when None), and the Grams are
  the sum of every microbatch's Grams added one after another in calibration
  order. With a ``mesh`` (an axis named ``"batch"``, of ``D`` devices, over
  one or several processes), each step captures ``D`` microbatches at once,
  one per device, and adds them to the running sum in that same order (the
  sum travels device to device, see :mod:`quant_core.capture`); the COMQ solve
  of every layer with one matrix splits its output channels over all the mesh's
  devices (:func:`comq_jax.comq`). Each device runs the same
  programs on the same shapes as a call without a mesh, so the result
  (variables, errors) is bitwise equal to the call without ``mesh`` and with
  the same ``microbatch`` on the same backend. ``microbatch`` (not the mesh)
  decides the float summation order; it is needed with a mesh of more than
  one device on ``"batch"``. Grouped convs, GPTQ and RTN solve unsplit. With
  several processes every process passes the same batches; each reads only
  its devices' rows.

  Args:
    model_or_apply: a linen ``Module`` (its ``apply`` is used), an
      ``apply_fn(variables, batch, **apply_kwargs)``, or an ``nnx.Module``
      (called as ``model(batch, **apply_kwargs)``; put it in eval mode first,
      e.g. ``model.eval()``). The module is never changed.
    variables: the linen model variables (must contain ``"params"``); ignored
      (pass None) for an NNX module.
    calibration_batches: model inputs (arrays or pytrees of arrays).
    solver: the default solver, from :func:`comq_jax.comq`,
      :func:`comq_jax.gptq` or :func:`comq_jax.rtn` (``"layer"`` granularity
      shares a scale per feature group; ``group_size`` counts inputs of the
      2-D view, for a conv of its im2col patches).
    rules: optional ordered ``(pattern, solver or None)`` pairs over the
      ``/``-joined module paths (e.g. ``"Dense_0"``, ``"block1/conv2"``,
      ``"layers/0"``; ``re.fullmatch``): the first match gives the layer's
      solver, and None keeps it in float (listed in ``skipped`` with the
      rule). Layers no rule matches take ``solver``.
    row_masks: optional, one mask per calibration batch (bool or 0/1), e.g.
      the attention mask of padded token batches. Rows where it is 0 never
      enter a Gram. A mask of shape ``S`` applies to a layer whose row axes
      (the input axes it does not contract; for a conv, the batch axes and
      output positions) start with ``S``, and is broadcast over the rest.
    on_unsupported: ``"error"`` (default) raises for a layer of a supported
      kind whose configuration has no 2-D view (DenseGeneral batch axes, an
      einsum that is not a weight contraction, a kernel of the wrong rank, a
      masked conv); ``"skip"`` leaves it in float and lists it in
      ``skipped``. Other linear-like modules (ConvTranspose, ConvLocal) and
      layers never called are always listed in ``skipped``.
    inputs: ``"fp"`` or ``"sequential"``.
    mesh: optional ``jax.sharding.Mesh`` with an axis ``"batch"``.
    microbatch: examples per microbatch, dividing every batch's size (all
      arrays of a batch, and its row mask, have examples on axis 0); None for
      whole batches (no mesh, or a mesh of one device on ``"batch"``).
    progress: show a ``tqdm`` bar over the layers. Either way the phases
      (plan, capture, solve) and every layer (its error against RTN and its
      solve time) are logged at INFO on the ``comq_jax.driver`` logger.
    **apply_kwargs: passed to every apply call (e.g. ``train=False``).

  Returns:
    A :class:`ModelQuantization`.

  Raises:
    ValueError: for a solver or rules of the wrong type, bad options, empty
      calibration data, a row mask of the
      wrong shape or one that leaves a layer without rows, a mesh without a
      ``"batch"`` axis or a microbatch that does not fit it, an unsupported
      layer with ``on_unsupported="error"``, an ``H`` that GPTQ cannot factor
      (raise ``damp``), or a model with no layer left to quantize; messages
      name the layer path.
  """
  _check_call(solver, inputs, on_unsupported, progress)
  checked_rules = rules_lib.check_rules(rules)
  capture.check_data_options(mesh, microbatch)
  target = capture.model_adapter(model_or_apply, variables, apply_kwargs)
  batches = capture.as_sequence(calibration_batches)
  masks = capture.check_row_masks(row_masks, batches)
  params = target.params
  solver_of = lambda path: rules_lib.solver_for(paths.path_name(path), checked_rules, solver)

  with programs_lib.count_compilations() as compilations, \
      programs_lib.Programs() as programs:
    def check_unsupported(call):
      if on_unsupported == "error" and solver_of(call.path)[0] is not None:
        raise layers.UnsupportedLayer(
            f"{paths.path_name(call.path)} ({call.kind}): {call.reason}. Add a rule "
            f"(pattern, None) for it, or pass on_unsupported='skip', to leave it in "
            f"float.")

    seen = capture.discover_layers(target, batches, masks, check_unsupported)
    todo, skipped = _plan(seen, params, target, solver_of)
    _LOG.info("plan: %d layers to quantize, %d left in float; %d calibration batches, "
              "inputs=%s", len(todo), len(skipped), len(batches), inputs)
    capture_seconds = 0.0
    solve_fns = {}

    def solve_program(layer_solver, args):
      if layer_solver not in solve_fns:
        solve_fns[layer_solver] = _solve_fn(layer_solver, mesh)
      key = ("solve", layer_solver) + programs_lib.signature(*args)
      return key, solve_fns[layer_solver]

    if inputs == "fp" and mesh is None:
      # The capture runs first: its compilation goes ahead of the solves'.
      capture.submit_capture(target, params, [layer.path for layer, _ in todo], batches,
                             masks, programs, microbatch)
    for layer, layer_solver in todo:
      shapes = _solve_shapes(layer.view, paths.get(params, layer.path)["kernel"].dtype)
      programs.submit(*solve_program(layer_solver, shapes), *shapes)

    passes = 0

    def grams_of(layer_paths):
      nonlocal capture_seconds, passes
      # The calibration data are checked on the first pass over them only.
      grams, seconds = capture.accumulate_grams(target, params, layer_paths, batches, masks,
                                                programs, mesh, microbatch,
                                                check_batches=passes == 0)
      passes += 1
      capture_seconds += seconds
      return grams

    grams = grams_of([layer.path for layer, _ in todo]) if inputs == "fp" else {}
    if inputs == "fp":
      _LOG.info("capture: Grams of %d layers in %.2fs (compilation waited %.2fs)",
                len(todo), capture_seconds, programs.wait_seconds)
    reports = []
    compile_wait_seconds = programs.wait_seconds
    solve_start = time.perf_counter()
    _LOG.info("solve: %d layers%s", len(todo),
              ", each after its own capture" if inputs == "sequential" else "")

    def run_solve(layer_solver, chunks):
      """``(outputs per chunk, seconds)``, compilation wait excluded."""
      key, fn = solve_program(layer_solver, chunks[0])
      program = programs.get(key, fn, *chunks[0])
      start = time.perf_counter()
      outs = jax.device_get([program(*chunk) for chunk in chunks])
      return outs, time.perf_counter() - start

    def finish(index, layer, layer_solver, groups, solved):
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
      leaf = paths.get(params, layer.path)
      kernel = leaf["kernel"]
      # device_put: jnp.asarray would compile a staging program per shape.
      leaf["kernel"] = jax.device_put(layer.view.kernel(result.weights).astype(kernel.dtype))
      total = lambda e: float(np.sqrt(np.sum(np.square(e, dtype=np.float64))))
      reports.append(LayerReport(
          path=name, shape=tuple(kernel.shape), bits=layer_solver.bits,
          error=total(result.error), rtn_error=total(rtn_err), seconds=seconds,
          matrices=(layer.view.groups, layer.view.d_in, layer.view.d_out),
          solver=layer_solver, quantization=result, view=layer.view))
      report = reports[-1]
      bar.layer_done("%s %d/%d %s %s: error %.4g (RTN %.4g), %.2fs",
                     layer_solver.method.upper(), index + 1, len(todo), name,
                     tuple(kernel.shape), report.error, report.rtn_error, seconds,
                     label=f"{name} error {report.error:.4g} (RTN {report.rtn_error:.4g})")

    # A solve runs on one core: with inputs from the FP model, layers are
    # independent and _SOLVES_IN_FLIGHT of them run at a time; results are
    # written back in layer order. On a mesh one at a time: every device (and
    # process) must launch the sharded solves in the same order.
    in_flight = _SOLVES_IN_FLIGHT if inputs == "fp" and mesh is None else 1
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool, \
        progress_lib.LayerProgress(_LOG, len(todo), solver.method.upper(), progress) as bar:
      for index, (layer, layer_solver) in enumerate(todo):
        name = paths.path_name(layer.path)
        if inputs == "sequential":
          grams = grams_of([layer.path])
        gram, count = grams.pop(layer.path)
        if float(count) == 0:
          if row_masks is not None:
            raise ValueError(f"{name}: the row masks cover zero of its calibration "
                             f"rows; every quantized layer needs at least one unmasked "
                             f"row.")
          skipped.append(SkippedLayer(name, layer.kind, "no calibration rows"))
          _LOG.warning("%s (%s) left in float: no calibration rows", name, layer.kind)
          continue
        kernel = paths.get(params, layer.path)["kernel"]
        # Reshapes on the host: eager device ops would compile once per shape.
        mats = layer.view.matrices(np.asarray(kernel)).astype(
            objective.compute_dtype(kernel.dtype))
        # On a mesh, solves take host Grams (their programs' inputs are unsharded).
        chunks = _group_chunks(mats, gram if mesh is None else np.asarray(gram))
        pending.append((index, layer, layer_solver, len(mats),
                        pool.submit(run_solve, layer_solver, chunks)))
        if len(pending) >= in_flight:
          finish(*pending.popleft())
      while pending:
        finish(*pending.popleft())
    solve_seconds = time.perf_counter() - solve_start
    _LOG.info("done: %d layers quantized, %d left in float; capture %.2fs, solve %.2fs, "
              "%d compilations (%.2fs)", len(reports), len(skipped), capture_seconds,
              solve_seconds, compilations[0], programs.compile_seconds)
    if not reports:
      raise ValueError("No layer was quantized: every linear layer was skipped ("
                       + "; ".join(f"{s.path}: {s.reason}" for s in skipped) + ").")
  new_variables, new_model = target.result(params)
  timings = Timings(capture_seconds=capture_seconds,
                    compile_seconds=programs.compile_seconds,
                    compile_wait_seconds=compile_wait_seconds,
                    solve_seconds=solve_seconds, compilations=compilations[0],
                    program_bytes=dict(programs.program_bytes))
  return ModelQuantization(variables=new_variables, layers=reports, skipped=skipped,
                           inputs=inputs, timings=timings, model=new_model)


def _plan(seen, params, target, solver_of):
  """``(todo, skipped)``: the layers to quantize in forward order, each with its
  solver, and those left in float."""
  module_kinds = target.module_kinds
  todo, skipped = [], []
  for layer in seen.values():
    name = paths.path_name(layer.path)
    layer_solver, pattern = solver_of(layer.path)
    if layer_solver is None:
      skipped.append(SkippedLayer(name, layer.kind, f"rule {pattern!r}"))
    elif layer.view is not None:
      todo.append((layer, layer_solver))
    else:
      skipped.append(SkippedLayer(name, layer.kind, layer.reason))
  for path in capture.kernel_paths(params):
    if path not in seen:
      module_class = module_kinds.get(path)
      kind = module_class.__name__ if module_class else "unknown module"
      if module_class is not None and layers.kind_of_class(module_class) is None:
        reason = f"{kind} is not a supported linear layer kind"
      else:
        reason = ("its kernel was not used by a supported layer's __call__ on the "
                  "calibration batches")
      skipped.append(SkippedLayer(paths.path_name(path), kind, reason))
  for path in target.tied_embeddings:
    skipped.append(SkippedLayer(paths.path_name(path), "embedding",
                                "tied to the embedding table"))
  if not todo and not skipped:
    raise ValueError("The model has no linear layer to quantize (supported: "
                     + ", ".join(kind.name for kind in layers.KINDS) + ").")
  for entry in skipped:
    log = _LOG.info if entry.reason.startswith("rule ") else _LOG.warning
    log("%s (%s) left in float: %s", entry.path, entry.kind, entry.reason)
  return todo, skipped
