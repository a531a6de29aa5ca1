"""Programs that run one block alone on stored hidden states.

A block's programs take the block's own variables (its parameters, and its other
state) as arguments, with layer paths relative to the block, so blocks of one
structure share every compiled program, and no program holds more than one
block's parameters. Hidden states are stored per calibration step (a batch, a
microbatch, or with a mesh one microbatch per device on a leading axis split
over the mesh's ``batch`` axis), on the device.
"""

import dataclasses
import time
from typing import Optional

from flax import linen as nn
import jax

from quant_core import blocks as blocks_lib
from quant_core import capture
from quant_core import layers
from quant_core import nnx_params


class _Recording:
  """A model adapter whose forward also records the block calls."""

  def __init__(self, target, recorder):
    self._target = target
    self._recorder = recorder
    self.params = target.params

  def forward(self, params, batch, on_call, grams, on_block=None):
    del on_block

    def recording(call):
      self._recorder.on_linear(call.path, call.inputs)
      return on_call(call)

    return self._target.forward(params, batch, recording, grams, on_block=self._recorder.hook)


def discover_blocks(target, batches, masks, match, on_unsupported=None):
  """``(seen layers, recorder)`` from one trace of the model on calibration batch 0's
  shapes: the recorder (a :class:`quant_core.blocks.BlockRecorder`) holds the block
  calls, the block of every layer and their order (see
  :func:`quant_core.capture.discover_layers` and :func:`quant_core.blocks.link_blocks`)."""
  recorder = blocks_lib.BlockRecorder(match, linen=isinstance(target, capture._LinenModel))
  seen = capture.discover_layers(_Recording(target, recorder), batches, masks,
                                 on_unsupported)
  blocks_lib.link_blocks(recorder.calls)
  return seen, recorder


def _storing(on_call, grams):
  """The linear-call hook of a block: a returned ``(gram, count)`` enters ``grams``."""

  def store(call):
    found = on_call(call)
    if found is not None:
      capture._add_gram(grams, call.path, found)

  return store


class _BlockTarget:
  """One block as a model adapter for :mod:`quant_core.capture`: its ``batch`` is the
  block's array inputs of one step, its ``params`` the block's variables."""

  def __init__(self, call: blocks_lib.BlockCall, per_device: bool):
    self.call = call
    self._per_device = per_device

  def _arguments(self, leaves):
    if self._per_device:
      leaves = [leaf[0] for leaf in leaves]
    return self.call.arguments(leaves)

  def outputs(self, variables, leaves):
    """The block's output leaves (with a per-device axis when ``per_device``)."""
    out = jax.tree.leaves(self.forward(variables, leaves, lambda call: None, {}))
    return [leaf[None] for leaf in out] if self._per_device else out

  @property
  def static_key(self):
    statics = tuple(repr(leaf) for leaf in self.call.leaves if leaf is not None)
    return (self.call.treedef, tuple(self.call.dynamic), statics, self._per_device)


class LinenBlock(_BlockTarget):
  """A linen block, applied as its unbound copy to its variables."""

  def __init__(self, call, variables, per_device=False):
    super().__init__(call, per_device)
    self.variables = blocks_lib.block_variables(variables, call.path)
    self.params = self.variables["params"]
    self.program_key = ("linen block", call.module) + self.static_key

  def block_variables(self, params):
    return dict(self.variables, params=params)

  def forward(self, variables, leaves, on_call, grams, on_block=None):
    del on_block

    args, kwargs = self._arguments(leaves)
    store = _storing(on_call, grams)
    with nn.intercept_methods(layers.intercept_linear_calls(store)):
      return self.call.module.apply(variables, *args, **kwargs)


class NNXBlock(_BlockTarget):
  """An NNX block, merged from its own graph definition and state."""

  def __init__(self, call, module, per_device=False):
    super().__init__(call, per_device)
    self._split = nnx_params.NNXParams(module)
    self.params = self._split.params
    self._rest = self._split.rest
    self.program_key = ("nnx block", self._split.graphdef) + self.static_key

  def block_variables(self, params):
    return {"params": params, "rest": self._rest}

  def forward(self, variables, leaves, on_call, grams, on_block=None):
    del on_block
    module = self._split.with_params(variables["params"], variables["rest"])

    args, kwargs = self._arguments(leaves)
    with layers.intercept_nnx_linear_calls(module, _storing(on_call, grams)):
      return module(*args, **kwargs)


def block_target(target, call, params, per_device=False):
  """The :class:`LinenBlock` or :class:`NNXBlock` of ``call`` in ``target`` (a
  :mod:`quant_core.capture` model adapter), with variables from ``params``."""
  if isinstance(target, capture._LinenModel):
    variables = dict(target.variables, params=params)
    return LinenBlock(call, variables, per_device)
  model = target.module_at(call.path)
  return NNXBlock(call, model, per_device)


def _per_device(fn, mesh, in_specs):
  """``fn`` on every device of ``mesh`` (outputs split over its ``batch`` axis)."""
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                       out_specs=jax.sharding.PartitionSpec(capture.DATA_AXIS),
                       check_vma=False)


def _specs():
  return jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(capture.DATA_AXIS)


def capture_block_inputs(target, params, call, match, steps, programs, mesh=None):
  """``(inputs, seconds)``: the array inputs of block ``call`` on every model step,
  from a pass of the whole model with ``params`` (XLA drops what comes after the
  block), one list of arrays per step (with a mesh, with a per-device leading
  axis); ``seconds`` excludes compilation."""
  def inputs(params, batch):
    found = []

    def on_block(path, module, args, kwargs, run):
      if len(found) == call.index:
        flat = jax.tree.leaves((args, kwargs))
        found.append([flat[i] for i in call.dynamic])
      else:
        found.append(None)
      return run()

    hook = blocks_lib.BlockHook(match, on_block)
    target.forward(params, batch, lambda c: None, {}, on_block=hook)
    values = found[call.index]
    return [v[None] for v in values] if mesh is not None else values

  replicated, split = _specs()
  fn = _per_device(inputs, mesh, (replicated, split))
  if mesh is not None:
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, replicated))
  stored, seconds = [], 0.0
  for step in steps:
    key = ("block inputs", call.index, mesh) + capture.programs_lib.signature(step[0])
    program = programs.get(key, fn, params, step[0])
    start = time.perf_counter()
    stored.append(jax.block_until_ready(program(params, step[0])))
    seconds += time.perf_counter() - start
  return stored, seconds


def propagate(block: _BlockTarget, variables, stored, programs, mesh=None):
  """``(outputs, seconds)``: the block's output leaves on every stored step, and the
  seconds that took (compilation excluded)."""
  replicated, split = _specs()
  fn = _per_device(block.outputs, mesh, (replicated, split))
  if mesh is not None:
    variables = jax.device_put(variables, jax.sharding.NamedSharding(mesh, replicated))
  outputs, seconds = [], 0.0
  for leaves in stored:
    key = ("propagate", block.program_key, mesh) + capture.programs_lib.signature(
        variables, leaves)
    program = programs.get(key, fn, variables, leaves)
    start = time.perf_counter()
    outputs.append(jax.block_until_ready(program(variables, leaves)))
    seconds += time.perf_counter() - start
  return outputs, seconds


def chained_inputs(call, previous_outputs, anchor_inputs):
  """The stored inputs of a block whose inputs all come from the previous block's
  outputs and the anchor's inputs (``call.sources``), one list per step."""
  steps = []
  for index in range(len(previous_outputs if previous_outputs is not None
                         else anchor_inputs)):
    values = []
    for kind, position in call.sources:
      if kind == "output":
        values.append(previous_outputs[index][position])
      else:
        values.append(anchor_inputs[index][position])
    steps.append(values)
  return steps


@dataclasses.dataclass
class StoredSteps:
  """Hidden states of one block, and the masks (and mesh flags) of their steps."""
  inputs: list
  masks: list
  valid: Optional[list]

  def fold_steps(self):
    """``(step, None)`` pairs for :func:`quant_core.capture.fold_steps`."""
    for index, leaves in enumerate(self.inputs):
      step = (leaves, self.masks[index])
      if self.valid is not None:
        step += (self.valid[index],)
      yield step, None

  def nbytes(self) -> int:
    return blocks_lib.step_nbytes(self.inputs)


def relative(path, block_path) -> tuple:
  return tuple(path)[len(block_path):]
