"""Block-wise quantization: one block at a time, on stored hidden states.

The calibration hidden states enter block ``b``; its layers are solved in forward
order (layers that read one array, such as q/k/v, from one Gram), then the block
runs on the same hidden states to give block ``b + 1``'s inputs. With
``inputs="sequential"`` every Gram comes from the block with its earlier layers
already quantized, and the block's quantized outputs feed the next block; with
``inputs="fp"`` everything comes from the full-precision model, one Gram pass per
block. Peak memory is that of one block (its parameters, its Grams, its programs'
activations for one step) and the hidden states of the calibration set, whatever
the depth. Layers outside every block are captured by a pass of the whole model.
"""

import logging

import jax

from quant_core import block_capture
from quant_core import blocks as blocks_lib
from quant_core import capture
from quant_core import paths

_LOG = logging.getLogger("comq_jax.driver")


def check_blocks(recorder, todo, blocks):
  """Raises ValueError when ``blocks`` matched no call, or a layer to quantize is
  called from two blocks (or from a block and outside)."""
  if not recorder.calls:
    examples = sorted({paths.path_name(layer.path[:-1]) for layer, _ in todo
                       if len(layer.path) > 1})[:6]
    raise ValueError(
        f"blocks={blocks!r} matched no module called by the model on the calibration "
        f"batches; modules holding linear layers are e.g. {examples}. Pass a pattern "
        f"over '/'-joined module paths or a module class.")
  for layer, _ in todo:
    owners = recorder.layer_block.get(layer.path, set())
    if len(owners) > 1:
      names = sorted("outside the blocks" if b is None else recorder.calls[b].name
                     for b in owners)
      raise ValueError(
          f"{paths.path_name(layer.path)} is called from {', '.join(names)}; block-wise "
          f"quantization needs each layer called from one block or only outside them "
          f"(keep it in float with a rule, or pass blocks=None).")


class _Run:
  """The state of one block-wise run."""

  def __init__(self, target, params, todo, recorder, match, programs, solves, mesh, steps,
               sequential):
    self.target = target
    self.params = params
    # The full-precision values, for inputs="fp" (the solves write into params).
    self.original = jax.tree.map(lambda leaf: leaf, params)
    self.todo = {layer.path: (layer, solver) for layer, solver in todo}
    self.recorder = recorder
    self.match = match
    self.programs = programs
    self.solves = solves
    self.mesh = mesh
    self.steps = steps
    self.sequential = sequential
    self.capture_seconds = 0.0
    self.hidden = None
    self.anchor_inputs = None
    self.outside_grams = None

  def _timed(self, fn, *args):
    out, seconds = fn(*args)
    self.capture_seconds += seconds
    return out

  def model_grams(self, layer_paths, params):
    grams, seconds = capture.fold_steps(self.target, params, layer_paths,
                                        ((step, None) for step in self.steps),
                                        self.programs, self.mesh)
    self.capture_seconds += seconds
    return grams

  def outside_layer(self, path):
    layer, layer_solver = self.todo[path]
    if self.sequential:
      self.solves.drain()
      gram, count = self.model_grams([path], self.params)[path]
    else:
      if self.outside_grams is None:
        outside = [p for kind, p in self.recorder.events if kind == "layer" and p in self.todo]
        self.outside_grams = self.model_grams(outside, self.original)
      gram, count = self.outside_grams.pop(path)
    self.solves.submit(layer, layer_solver, gram, count)

  def block(self, call, number, total):
    calls = self.recorder.calls
    weights = self.params if self.sequential else self.original
    if call.is_anchor:
      if self.sequential:
        self.solves.drain()
      inputs = self._timed(block_capture.capture_block_inputs, self.target, weights, call,
                           self.match, self.steps, self.programs, self.mesh)
      # Kept for later blocks: only the values they take again (positions, masks).
      needed = set()
      for later in calls[call.index + 1:]:
        if later.is_anchor:
          break
        needed |= {position for kind, position in later.sources if kind == "same"}
      self.anchor_inputs = [[value if i in needed else None for i, value in enumerate(step)]
                            for step in inputs]
    else:
      inputs = block_capture.chained_inputs(call, self.hidden, self.anchor_inputs)
    block = block_capture.block_target(self.target, call, self.params,
                                       per_device=self.mesh is not None)
    stored = block_capture.StoredSteps(
        inputs, [step[1] for step in self.steps],
        [step[2] for step in self.steps] if self.mesh is not None else None)
    layer_paths = [path for path in call.layers if path in self.todo]
    _LOG.info("block %d/%d %s: %d layers to quantize, hidden states %.1f MB", number,
              total, call.name, len(layer_paths), stored.nbytes() / 2**20)
    groups = call.groups if self.sequential else [call.layers]
    for group in groups:
      group = [path for path in group if path in self.todo]
      if not group:
        continue
      if self.sequential:
        self.solves.drain()
      variables = block.block_variables(paths.get(weights, call.path))
      relative = [block_capture.relative(path, call.path) for path in group]
      grams, seconds = capture.fold_steps(block, variables, relative, stored.fold_steps(),
                                          self.programs, self.mesh)
      self.capture_seconds += seconds
      for path, rel in zip(group, relative, strict=True):
        layer, layer_solver = self.todo[path]
        self.solves.submit(layer, layer_solver, *grams[rel])
    later = calls[call.index + 1] if call.index + 1 < len(calls) else None
    if later is not None and not later.is_anchor and any(
        kind == "output" for kind, _ in later.sources):
      if self.sequential:
        self.solves.drain()
      variables = block.block_variables(paths.get(weights, call.path))
      self.hidden = self._timed(block_capture.propagate, block, variables, inputs,
                                self.programs, self.mesh)
    else:
      self.hidden = None


def quantize_blocks(target, params, todo, recorder, match, batches, masks, programs,
                    solves, *, inputs, mesh, microbatch) -> float:
  """Quantizes ``todo`` block by block (see the module docstring); returns the
  seconds spent capturing Grams and hidden states (compilation excluded)."""
  first_layer = paths.path_name(todo[0][0].path) if todo else None
  for index, batch in enumerate(batches):
    capture.check_batch(index, batch, batches[0] if index else batch, first_layer)
  steps = list(capture.model_steps(batches, masks, microbatch, mesh))
  for layer, layer_solver in todo:
    solves.compile_ahead(layer, layer_solver)
  run = _Run(target, params, todo, recorder, match, programs, solves, mesh, steps,
             sequential=inputs == "sequential")
  total = len(recorder.calls)
  for kind, item in recorder.events:
    if kind == "block":
      run.block(recorder.calls[item], item + 1, total)
    elif item in run.todo:
      run.outside_layer(item)
  return run.capture_seconds


def plan_blocks(model_or_apply, variables, example_batch, *, blocks, **apply_kwargs):
  """The blocks of a model and their layers, from shapes only (nothing is allocated:
  the model and ``example_batch`` may be abstract, e.g. from ``nnx.eval_shape`` and
  ``jax.ShapeDtypeStruct``).

  Args:
    model_or_apply, variables, **apply_kwargs: as in :func:`comq_jax.quantize_model`.
    example_batch: one calibration batch, or its shapes.
    blocks: as in :func:`comq_jax.quantize_model`.

  Returns:
    ``(blocks, outside)``: a list of dicts in call order, ``{"block": path,
    "param_bytes": bytes of the block's parameters, "input_bytes": bytes of its
    array inputs for the batch, "anchor": whether its inputs come from a pass of
    the whole model, "groups": [[(layer path, groups, d_in, d_out), ...] per group
    of layers reading one array]}``, and the layers outside every block.
  """
  match = blocks_lib.block_matcher(blocks)
  target = capture.model_adapter(model_or_apply, variables, apply_kwargs)
  seen, recorder = block_capture.discover_blocks(target, [example_batch], [None], match)
  nbytes = lambda tree: int(sum(leaf.size * leaf.dtype.itemsize
                                for leaf in jax.tree.leaves(tree)))

  def describe(path):
    view = seen[path].view
    return (paths.path_name(path), view.groups, view.d_in, view.d_out)

  plan = []
  for call in recorder.calls:
    plan.append({
        "block": call.name, "param_bytes": nbytes(paths.get(target.params, call.path)),
        "input_bytes": nbytes(call._inputs), "anchor": call.is_anchor,
        "groups": [[describe(p) for p in group if seen[p].view is not None]
                   for group in call.groups]})
  outside = [describe(p) for kind, p in recorder.events
             if kind == "layer" and seen[p].view is not None]
  return plan, outside
