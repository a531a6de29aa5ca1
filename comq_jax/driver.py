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

import logging
import time
from typing import Any, Optional, Sequence

import jax

from comq_jax import blockwise
from comq_jax import layer_solves
from comq_jax import rules as rules_lib
from comq_jax import solvers
from comq_jax.results import ModelQuantization
from comq_jax.results import SkippedLayer
from comq_jax.results import Timings
from quant_core import block_capture
from quant_core import blocks as blocks_lib
from quant_core import capture
from quant_core import layers
from quant_core import paths
from quant_core import programs as programs_lib
from quant_core import progress as progress_lib

INPUTS = ("fp", "sequential")
ON_UNSUPPORTED = ("error", "skip")

_LOG = logging.getLogger(__name__)

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
                   microbatch: Optional[int] = None, blocks=None,
                   progress: bool = False, **apply_kwargs) -> ModelQuantization:
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

  **Blocks.** With ``blocks`` (a pattern over ``/``-joined module paths, such
  as ``r"layers/\\d+"``, or a module class, or a tuple of them) the model is
  quantized one block at a time, as LLM tools do (:mod:`comq_jax.blockwise`):
  the calibration hidden states entering a block are captured once and kept
  on the device, one array per step; the block's layers are solved in forward
  order from the block run alone on them (with ``"sequential"``, each group of
  layers reading one array, such as q/k/v, sees the block with its earlier
  layers quantized, so the result equals ``"sequential"`` without blocks, in
  one pass per group instead of one model pass per layer); then the block's
  outputs become the next block's inputs. A block's arguments that are not
  the previous block's outputs must be values an earlier block received
  (positions, masks); otherwise that block's inputs are captured from the
  whole model again. Peak device memory is about one block's parameters, its
  Grams and the hidden states (``N_tokens x d_model`` per array the blocks
  pass on), whatever the depth; blocks of one structure share every program.
  Layers outside the blocks take a pass of the whole model each (``"fp"``:
  one pass for all of them).

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
    blocks: optional, the repeated blocks to quantize one at a time (see
      above); None quantizes layer by layer over the whole model.
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
      ``"batch"`` axis or a microbatch that does not fit it, ``blocks`` that
      match no module call, a block called twice or a layer called from two
      blocks, an unsupported
      layer with ``on_unsupported="error"``, an ``H`` that GPTQ cannot factor
      (raise ``damp``), or a model with no layer left to quantize; messages
      name the layer path.
  """
  _check_call(solver, inputs, on_unsupported, progress)
  checked_rules = rules_lib.check_rules(rules)
  match = None if blocks is None else blocks_lib.block_matcher(blocks)
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

    if match is None:
      seen = capture.discover_layers(target, batches, masks, check_unsupported)
    else:
      seen, recorder = block_capture.discover_blocks(target, batches, masks, match,
                                                     check_unsupported)
    todo, skipped = _plan(seen, params, target, solver_of)
    if match is not None:
      blockwise.check_blocks(recorder, todo, blocks)
    _LOG.info("plan: %d layers to quantize, %d left in float; %d calibration batches, "
              "inputs=%s%s", len(todo), len(skipped), len(batches), inputs,
              "" if match is None else f", {len(recorder.calls)} blocks")
    # A solve runs on one core: with inputs from the FP model, layers are
    # independent and _SOLVES_IN_FLIGHT of them run at a time; results are
    # written back in layer order. On a mesh one at a time: every device (and
    # process) must launch the sharded solves in the same order.
    in_flight = layer_solves.SOLVES_IN_FLIGHT if inputs == "fp" and mesh is None else 1
    start = time.perf_counter()
    with progress_lib.LayerProgress(_LOG, len(todo), solver.method.upper(), progress) as bar:
      solves = layer_solves.LayerSolves(params, programs, mesh, in_flight, bar, len(todo),
                                        row_masks is not None, _LOG)
      try:
        if match is None:
          capture_seconds = _by_layers(target, params, todo, batches, masks, programs,
                                       solves, inputs=inputs, mesh=mesh,
                                       microbatch=microbatch)
        else:
          capture_seconds = blockwise.quantize_blocks(
              target, params, todo, recorder, match, batches, masks, programs, solves,
              inputs=inputs, mesh=mesh, microbatch=microbatch)
        solves.drain()
      finally:
        solves.close()
    reports = solves.reports
    skipped += solves.skipped
    solve_seconds = time.perf_counter() - start - capture_seconds
    _LOG.info("done: %d layers quantized, %d left in float; capture %.2fs, solve %.2fs, "
              "%d compilations (%.2fs)", len(reports), len(skipped), capture_seconds,
              solve_seconds, compilations[0], programs.compile_seconds)
    if not reports:
      raise ValueError("No layer was quantized: every linear layer was skipped ("
                       + "; ".join(f"{s.path}: {s.reason}" for s in skipped) + ").")
  new_variables, new_model = target.result(params)
  timings = Timings(capture_seconds=capture_seconds,
                    compile_seconds=programs.compile_seconds,
                    compile_wait_seconds=programs.wait_seconds,
                    solve_seconds=solve_seconds, compilations=compilations[0],
                    program_bytes=dict(programs.program_bytes))
  return ModelQuantization(variables=new_variables, layers=reports, skipped=skipped,
                           inputs=inputs, timings=timings, model=new_model)


def _by_layers(target, params, todo, batches, masks, programs, solves, *, inputs, mesh,
               microbatch) -> float:
  """Quantizes ``todo`` layer by layer: with ``inputs="fp"`` from one pass that
  captures every Gram, with ``"sequential"`` one pass per layer. Returns the
  capture seconds (compilation excluded)."""
  if inputs == "fp" and mesh is None:
    # The capture runs first: its compilation goes ahead of the solves'.
    capture.submit_capture(target, params, [layer.path for layer, _ in todo], batches,
                           masks, programs, microbatch)
  for layer, layer_solver in todo:
    solves.compile_ahead(layer, layer_solver)
  seconds, passes = 0.0, 0

  def grams_of(layer_paths):
    nonlocal seconds, passes
    # The calibration data are checked on the first pass over them only.
    grams, taken = capture.accumulate_grams(target, params, layer_paths, batches, masks,
                                            programs, mesh, microbatch,
                                            check_batches=passes == 0)
    passes += 1
    seconds += taken
    return grams

  if inputs == "fp":
    grams = grams_of([layer.path for layer, _ in todo])
    _LOG.info("capture: Grams of %d layers in %.2fs (compilation waited %.2fs)",
              len(todo), seconds, programs.wait_seconds)
  _LOG.info("solve: %d layers%s", len(todo),
            ", each after its own capture" if inputs == "sequential" else "")
  for layer, layer_solver in todo:
    if inputs == "sequential":
      grams = grams_of([layer.path])
    solves.submit(layer, layer_solver, *grams.pop(layer.path))
  return seconds


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
