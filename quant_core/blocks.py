"""Repeated blocks of a model (decoder layers, transformer blocks, ResNet stages),
found by interception and run one at a time on stored hidden states.

Block-wise quantization (:func:`comq_jax.quantize_model` with ``blocks``) needs,
for each block, the values its call receives (hidden states, positions, masks),
and a way to run the block alone on them. One trace of the model on shapes
(:func:`discover_blocks`) records every block call: its arguments, which of
them are outputs of the block called just before (the chain that carries the
hidden states), which are the same values an earlier block received (positions,
attention masks), and which linear layers the block calls, grouped by shared
input (q/k/v read one array). A block's module runs alone as
``module.apply(its variables, *args)`` (linen) or ``submodule(*args)`` (NNX).
"""

import dataclasses
import re
from typing import Any, Callable, Optional

from flax import linen as nn
from flax import nnx
import jax
import numpy as np

from quant_core import paths as paths_lib


def block_matcher(blocks) -> Callable[[tuple, Any], bool]:
  """``match(path, module) -> bool`` from ``blocks``: a pattern over ``/``-joined
  module paths (``re.fullmatch``), a module class, or a tuple or list of them.

  Raises:
    ValueError: for anything else, or an invalid pattern.
  """
  items = list(blocks) if isinstance(blocks, (tuple, list)) else [blocks]
  patterns, classes = [], []
  for item in items:
    if isinstance(item, str):
      try:
        patterns.append(re.compile(item))
      except re.error as error:
        raise ValueError(f"blocks pattern {item!r} is not a valid regular expression: "
                         f"{error}.") from None
    elif isinstance(item, type) and issubclass(item, (nn.Module, nnx.Module)):
      classes.append(item)
    else:
      raise ValueError(
          "blocks must be a pattern over '/'-joined module paths (e.g. r'layers/\\d+'), "
          "a linen or NNX module class, or a tuple of them; got "
          f"{item!r} of type {type(item).__name__}.")
  if not items:
    raise ValueError("blocks is empty; pass None to quantize without blocks.")
  classes = tuple(classes)

  def match(path, module) -> bool:
    if classes and isinstance(module, classes):
      return True
    name = paths_lib.path_name(path)
    return any(pattern.fullmatch(name) for pattern in patterns)

  return match


def _is_dynamic(leaf) -> bool:
  return isinstance(leaf, (jax.Array, jax.core.Tracer))


class BlockHook:
  """Called around every call of a matching block (the outermost one when blocks
  nest): ``on_call(path, module, args, kwargs, run)`` returns the block's output,
  ``run()`` computes it."""

  def __init__(self, match, on_call):
    self.match = match
    self.on_call = on_call
    self._active = 0

  def wrap(self, path, module, args, kwargs, run):
    if self._active:
      return run()
    self._active += 1
    try:
      return self.on_call(tuple(path), module, args, kwargs, run)
    finally:
      self._active -= 1

  def linen_interceptor(self):
    """An ``nn.intercept_methods`` interceptor."""

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__" or not self.match(tuple(module.path), module):
        return next_fun(*args, **kwargs)
      return self.wrap(module.path, module, args, kwargs, lambda: next_fun(*args, **kwargs))

    return interceptor


class nnx_block_calls:  # noqa: N801 (a context manager, used like a function)
  """Context manager: ``hook`` wraps the calls of ``model``'s matching submodules
  (their classes' ``__call__`` is wrapped for its duration and restored)."""

  def __init__(self, model: nnx.Module, hook: BlockHook):
    self._paths = {id(module): tuple(path) for path, module in nnx.iter_modules(model)
                   if path and hook.match(tuple(path), module)}
    self._classes = {type(module) for _, module in nnx.iter_modules(model)
                     if id(module) in self._paths}
    self._hook = hook
    self._saved = {}

  def __enter__(self):
    for cls in self._classes:
      original = cls.__call__
      self._saved[cls] = original

      def call(module, *args, _original=original, **kwargs):
        path = self._paths.get(id(module))
        if path is None:
          return _original(module, *args, **kwargs)
        return self._hook.wrap(path, module, args, kwargs,
                               lambda: _original(module, *args, **kwargs))

      cls.__call__ = call
    return self

  def __exit__(self, *exc):
    for cls, original in self._saved.items():
      cls.__call__ = original
    self._saved.clear()
    return False


@dataclasses.dataclass
class BlockCall:
  """One block call seen on shapes.

  Attributes:
    index: position among the block calls, in forward order.
    path: the block's module path.
    module: the block (linen: an unbound copy; NNX: None, found by path).
    treedef: structure of ``(args, kwargs)``.
    leaves: their leaves, arrays replaced by None (those are the block's inputs).
    dynamic: positions of the array leaves, in order.
    sources: per array leaf, ``("output", k)``: leaf ``k`` of the previous block's
      output; ``("same", i)``: the value the anchor block (the last one whose
      inputs come from the model) received as its array leaf ``i``; or None when
      this block is itself an anchor.
    layers: paths of the linear layers it calls, in call order.
    groups: those paths grouped by shared input array, in order of first call.
  """
  index: int
  path: tuple
  module: Any
  treedef: Any
  leaves: list
  dynamic: list
  sources: Optional[list] = None
  layers: list = dataclasses.field(default_factory=list)
  groups: list = dataclasses.field(default_factory=list)
  _inputs: list = dataclasses.field(default_factory=list, repr=False)
  _outputs: list = dataclasses.field(default_factory=list, repr=False)
  _group_inputs: list = dataclasses.field(default_factory=list, repr=False)

  @property
  def name(self) -> str:
    return paths_lib.path_name(self.path)

  @property
  def is_anchor(self) -> bool:
    return self.sources is None

  def add_layer(self, path, inputs):
    if path in self.layers:
      return
    self.layers.append(path)
    for index, seen in enumerate(self._group_inputs):
      if seen is inputs:
        self.groups[index].append(path)
        return
    self._group_inputs.append(inputs)
    self.groups.append([path])

  def arguments(self, dynamic_values):
    """``(args, kwargs)`` with the array leaves from ``dynamic_values``."""
    leaves = list(self.leaves)
    for position, value in zip(self.dynamic, dynamic_values, strict=True):
      leaves[position] = value
    return jax.tree.unflatten(self.treedef, leaves)


class BlockRecorder:
  """Records block calls and the block of every linear call while the model is
  traced (:func:`discover_blocks`)."""

  def __init__(self, match, linen: bool):
    self.calls = []
    self.layer_block = {}
    # ("block", index) and ("layer", path) of layers outside blocks, in call order.
    self.events = []
    self._linen = linen
    self._current = None
    self.hook = BlockHook(match, self._on_block)

  def _on_block(self, path, module, args, kwargs, run):
    flat, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(flat) if _is_dynamic(leaf)]
    leaves = [None if i in dynamic else leaf for i, leaf in enumerate(flat)]
    # Unnamed, so that blocks of one structure are equal (and share programs).
    unbound = module.clone(parent=None, name=None) if self._linen else None
    call = BlockCall(index=len(self.calls), path=path, module=unbound, treedef=treedef,
                     leaves=leaves, dynamic=dynamic)
    call._inputs = [flat[i] for i in dynamic]
    self.calls.append(call)
    self.events.append(("block", call.index))
    self._current = call
    try:
      out = run()
    finally:
      self._current = None
    call._outputs = jax.tree.leaves(out)
    return out

  def on_linear(self, path, inputs):
    """Notes a linear call (inside the current block, if any)."""
    block = None if self._current is None else self._current.index
    if block is None and path not in self.layer_block:
      self.events.append(("layer", path))
    self.layer_block.setdefault(path, set()).add(block)
    if self._current is not None:
      self._current.add_layer(path, inputs)


def link_blocks(calls) -> None:
  """Sets every call's ``sources`` (see :class:`BlockCall`).

  Raises:
    ValueError: when a block is called more than once.
  """
  seen = {}
  anchor = None
  for call in calls:
    if call.path in seen:
      raise ValueError(
          f"block {call.name} is called more than once in one forward pass; block-wise "
          f"quantization needs one call per block (a shared block's layers see several "
          f"inputs). Match its inner modules with blocks, or pass blocks=None.")
    seen[call.path] = call
    previous = calls[call.index - 1] if call.index else None
    sources = []
    for leaf in call._inputs:
      source = None
      if previous is not None:
        source = next((("output", k) for k, out in enumerate(previous._outputs)
                       if out is leaf), None)
      if source is None and anchor is not None:
        source = next((("same", i) for i, value in enumerate(anchor._inputs)
                       if value is leaf), None)
      if source is None:
        sources = None
        break
      sources.append(source)
    call.sources = sources
    if sources is None:
      anchor = call


def block_variables(variables, path) -> dict:
  """``{collection: subtree at path}`` of a linen model's variables."""
  out = {}
  for collection, tree in variables.items():
    try:
      out[collection] = paths_lib.get(tree, path)
    except (KeyError, IndexError, TypeError):
      continue
  return out


def step_nbytes(values) -> int:
  return int(sum(np.prod(np.shape(v)) * np.dtype(v.dtype).itemsize
                 for v in jax.tree.leaves(values)))
