"""The Gram of every linear layer's inputs, captured by interception.

One jitted forward pass per calibration batch (or microbatch) adds to the Gram
``H = X^T X`` of every supported layer's input rows (:mod:`quant_core.layers`
finds the layers and their 2-D views; the model is not rewritten). Row masks
keep padded rows out, microbatches bound the memory of one step, and a mesh
splits the steps data-parallel with results bitwise equal to one device.

COMQ, GPTQ and round-to-nearest (:mod:`comq_jax`) and INQ's data-aware steps
(:mod:`inq_jax.compensation`) read their layer statistics from here.
"""

import collections.abc
import contextlib
import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple, Optional, Sequence

import flax
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from quant_core import blocks as blocks_lib
from quant_core import layers
from quant_core import nnx_params
from quant_core import paths as paths_lib
from quant_core import programs as programs_lib
from quant_core import validation


class GramAccumulator(NamedTuple):
  """Running Gram matrix ``sum_b X_b^T X_b`` and its row count."""
  gram: jax.Array
  count: jax.Array


def gram_matrix(x):
  x = x.astype(jnp.float32)
  return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def accumulate_gram(acc: Optional[GramAccumulator], x_batch) -> GramAccumulator:
  """Adds one calibration batch to a streamed Gram matrix (float32).

  .. math:: H \\leftarrow H + X_b^\\top X_b

  Args:
    acc: the accumulator so far, or None to start one.
    x_batch: ``(n, d_in)`` layer inputs of this batch.

  Returns:
    The updated :class:`GramAccumulator`.
  """
  x_batch = jnp.asarray(x_batch)
  if x_batch.ndim != 2:
    raise ValueError(
        f"x_batch must be 2-D (rows, d_in), got shape {x_batch.shape}.")
  validation.check_floating(x_batch, "x_batch")
  validation.check_finite(x_batch, "x_batch")
  g = gram_matrix(x_batch)
  n = jnp.asarray(x_batch.shape[0], jnp.int32)
  if acc is None:
    return GramAccumulator(gram=g, count=n)
  if acc.gram.shape != g.shape:
    raise ValueError(
        f"x_batch has d_in={x_batch.shape[1]} but the accumulator holds a "
        f"Gram of shape {acc.gram.shape}.")
  return GramAccumulator(gram=acc.gram + g, count=acc.count + n)


class _LinenModel:
  """A linen model: ``apply_fn(variables, batch, **apply_kwargs)`` and its params.

  For a linen ``Module`` the Grams leave the forward pass through ``sow`` into
  a variable collection, so layers inside ``nn.remat`` (and other lifted
  transforms that carry collections) are captured too; a plain apply function
  hands them back through a dict.
  """

  def __init__(self, model_or_apply, variables, apply_kwargs):
    if "params" not in variables:
      raise ValueError("variables must contain a 'params' collection.")
    self._module = model_or_apply if isinstance(model_or_apply, nn.Module) else None
    self._apply = layers.apply_fn_of(model_or_apply)
    self._variables = variables
    self._kwargs = apply_kwargs
    self.params = flax.core.unfreeze(variables["params"])
    self.variables = variables
    self.module_kinds = {}
    # Embedding tables used as output layers (``attend``): they stay in float.
    self.tied_embeddings = {}

  def forward(self, params, batch, on_call, grams, on_block=None):
    """The model on ``batch`` with ``params``, ``on_call(call)`` at every linear
    call; a returned ``(gram, count)`` is added to ``grams[call.path]``.
    ``on_block``: an optional :class:`quant_core.blocks.BlockHook`."""
    kinds = self.module_kinds

    def record_kind(next_fun, args, kwargs, context):
      kinds.setdefault(context.module.path, type(context.module))
      if context.method_name == "attend" and isinstance(context.module, nn.Embed):
        self.tied_embeddings.setdefault(tuple(context.module.path), "nn.Embed")
      return next_fun(*args, **kwargs)

    def store(call):
      found = on_call(call)
      if found is not None:
        if self._module is not None:
          call.module.sow(_GRAMS, "gram", found)
        else:
          _add_gram(grams, call.path, found)

    variables = dict(self._variables, params=params)
    blocks = (nn.intercept_methods(on_block.linen_interceptor()) if on_block is not None
              else contextlib.nullcontext())
    with nn.intercept_methods(record_kind), blocks, \
        nn.intercept_methods(layers.intercept_linear_calls(store)):
      if self._module is None:
        self._apply(variables, batch, **self._kwargs)
        return
      _, state = self._apply(variables, batch, mutable=[_GRAMS], **self._kwargs)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        state.get(_GRAMS, {}), is_leaf=lambda x: isinstance(x, tuple))[0]:
      keys = paths_lib.keys_of(path[:-1])
      for found in leaf:
        _add_gram(grams, keys, found)

  def result(self, params):
    return dict(self._variables, params=params), None


# The mesh axis that calibration batches are split over.
DATA_AXIS = "batch"


# The variable collection that carries the Grams out of a linen forward pass.
_GRAMS = "comq_grams"


def _add_gram(grams, path, found):
  # A layer called twice: both uses enter its objective.
  if path in grams:
    found = (grams[path][0] + found[0], grams[path][1] + found[1])
  grams[path] = found


class _NNXModel:
  """An NNX module, called as ``model(batch, **apply_kwargs)``; never mutated."""

  def __init__(self, model, apply_kwargs):
    self._split = nnx_params.NNXParams(model)
    self._model = model
    self._kwargs = apply_kwargs
    self.params = self._split.params
    self.module_kinds = {tuple(path): type(module)
                         for path, module in nnx.iter_modules(model)}
    self.tied_embeddings = {}

  def module_at(self, path) -> nnx.Module:
    """The submodule of the (unchanged) user's module at ``path``."""
    for found, module in nnx.iter_modules(self._model):
      if tuple(found) == tuple(path):
        return module
    raise KeyError(path)

  def forward(self, params, batch, on_call, grams, on_block=None):
    """See :meth:`_LinenModel.forward`."""
    model = self._split.with_params(params)

    def store(call):
      found = on_call(call)
      if found is not None:
        _add_gram(grams, call.path, found)

    paths_of = {id(module): tuple(path) for path, module in nnx.iter_modules(model)}
    attend = nnx.Embed.attend

    def recording_attend(module, *args, **kwargs):
      if id(module) in paths_of:
        self.tied_embeddings.setdefault(paths_of[id(module)], "nnx.Embed")
      return attend(module, *args, **kwargs)

    nnx.Embed.attend = recording_attend
    blocks = (blocks_lib.nnx_block_calls(model, on_block) if on_block is not None
              else contextlib.nullcontext())
    try:
      with blocks, layers.intercept_nnx_linear_calls(model, store):
        model(batch, **self._kwargs)
    finally:
      nnx.Embed.attend = attend

  def result(self, params):
    return {"params": params}, self._split.with_params(params)


def model_adapter(model_or_apply, variables, apply_kwargs):
  """The model to quantize, linen or NNX."""
  if isinstance(model_or_apply, nnx.Module):
    return _NNXModel(model_or_apply, apply_kwargs)
  if not isinstance(model_or_apply, nn.Module) and not callable(model_or_apply):
    raise ValueError("the model must be a linen Module, an apply_fn(variables, batch, "
                     "**kwargs) or an nnx.Module, got "
                     f"{type(model_or_apply).__name__}.")
  if not isinstance(variables, collections.abc.Mapping):
    raise ValueError("variables must be the linen model's variables, a dict with a 'params' "
                     f"collection, got {type(variables).__name__} (variables=None is for an "
                     "nnx.Module).")
  return _LinenModel(model_or_apply, variables, apply_kwargs)


class SeenLayer(NamedTuple):
  """A linear layer seen during calibration (static, from tracing)."""
  path: tuple
  kind: str
  view: Optional[layers.LinearView]
  reason: Optional[str]
  row_shape: tuple


def _mask_rows(name, mask, row_shape):
  """A ``(rows,)`` 0/1 float weight from a row mask broadcast over ``row_shape``."""
  if tuple(row_shape[:mask.ndim]) != tuple(mask.shape):
    raise ValueError(
        f"{name}: a row mask of shape {tuple(mask.shape)} does not match the layer's "
        f"row axes {tuple(row_shape)}; the mask must equal their leading axes "
        f"(e.g. (batch, tokens) for token inputs, (batch,) for any layer).")
  trailing = (1,) * (len(row_shape) - mask.ndim)
  weight = jnp.broadcast_to(mask.reshape(mask.shape + trailing), row_shape)
  return weight.reshape(-1).astype(jnp.float32)


def capture_fn(target, targets, on_unsupported=None):
  """A function ``(params, batch, mask) -> {path: (gram, count)}`` and the layers
  it sees (filled in while it is traced). ``on_unsupported(call)`` runs, while
  tracing, for each call of a layer without a 2-D view, before the layer
  computes (so it can raise before a misshapen layer fails in Flax)."""
  seen = {}

  def capture(params, batch, mask):
    grams = {}

    def on_call(call):
      stored = _stored_kernel_shape(target.params, call.path)
      if call.view is not None and stored != call.view.kernel_shape:
        # e.g. nn.scan / nn.vmap: one kernel per step is stacked in the params.
        call = dataclasses.replace(call, view=None, reason=(
            f"its kernel is {stored} in the params but {call.view.kernel_shape} at the "
            f"call (a layer inside nn.scan or nn.vmap is not supported)"))
      row_shape = (call.view.row_shape(jnp.shape(call.inputs))
                   if call.view is not None else ())
      seen.setdefault(call.path, SeenLayer(path=call.path, kind=call.kind, view=call.view,
                                        reason=call.reason, row_shape=row_shape))
      if call.view is None and on_unsupported is not None:
        on_unsupported(call)
      if call.view is None or (targets is not None and call.path not in targets):
        return None
      if mask is None:
        weight, count = None, jnp.asarray(math.prod(row_shape), jnp.float32)
      else:
        weight = _mask_rows(paths_lib.path_name(call.path), mask, row_shape)
        count = jnp.sum(weight)
      return call.view.gram(call.inputs, weight), count

    target.forward(params, batch, on_call, grams)
    return grams

  return capture, seen


def _stored_kernel_shape(params, path):
  try:
    return tuple(paths_lib.get(params, path)["kernel"].shape)
  except (KeyError, IndexError, TypeError):
    return None


def kernel_paths(params):
  """Module paths of every ``kernel`` leaf with ndim >= 2, in tree order."""
  paths = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = paths_lib.keys_of(path)
    if keys and keys[-1] == "kernel" and jnp.ndim(leaf) >= 2:
      paths.append(keys[:-1])
  return paths


def as_sequence(calibration_batches):
  """The batches as a sequence: a ``Sequence`` as it is (a lazy one stays
  lazy), any other iterable as a list. Raises ValueError when empty."""
  if isinstance(calibration_batches, (np.ndarray, jax.Array)):
    raise ValueError(
        f"calibration_batches must be a sequence of batches, got one array of shape "
        f"{tuple(calibration_batches.shape)} (it would be read row by row); pass [batch].")
  batches = (calibration_batches if isinstance(calibration_batches, collections.abc.Sequence)
             else list(calibration_batches))
  if not batches:
    raise ValueError("calibration_batches is empty.")
  return batches


def _shapes_text(batch) -> str:
  shapes = [tuple(np.shape(leaf)) for leaf in jax.tree.leaves(batch)]
  return str(shapes[0]) if len(shapes) == 1 else str(shapes)


# Errors of a batch that does not fit the model: ours (a layer's input axes do
# not fit its kernel) and Flax's (a parameter made with another shape).
_MISFIT_ERRORS = (layers.InputShapeMismatch, flax.errors.ScopeParamShapeError)


def misfit_error(index: int, batch, error: Exception) -> ValueError:
  """The ValueError for calibration batch ``index`` that does not fit the model."""
  return ValueError(f"calibration batch {index} has shape {_shapes_text(batch)}, which "
                    f"does not fit the model: {error}")


def check_batch(index: int, batch, first, first_layer: Optional[str] = None) -> None:
  """Raises ValueError when calibration batch ``index`` is another pytree than
  batch 0 (``first``), or holds NaN or inf."""
  if index and jax.tree.structure(batch) != jax.tree.structure(first):
    raise ValueError(f"calibration batch {index} has structure "
                     f"{jax.tree.structure(batch)}, batch 0 has {jax.tree.structure(first)}; "
                     f"every batch must be the same pytree.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    host = np.asarray(leaf)
    if np.issubdtype(host.dtype, np.inexact) or host.dtype == jnp.bfloat16:
      bad = int(np.size(host) - np.count_nonzero(np.isfinite(host.astype(np.float32))))
      if bad:
        layer = f" (the inputs of {first_layer} and of every layer after it)" if (
            first_layer) else ""
        raise ValueError(
            f"calibration batch {index} has {bad} non-finite values (NaN or inf) at "
            f"{jax.tree_util.keystr(path) or 'batch'}{layer}; calibration data must be "
            f"finite.")


def discover_layers(target, batches, masks, on_unsupported=None):
  """Traces the model on calibration batch 0 and returns the layers it calls
  (``{path: SeenLayer}`` in call order); a batch that does not fit the model
  raises ValueError naming the batch, the shape given and what the layer expects."""
  discover, seen = capture_fn(target, None, on_unsupported)
  try:
    jax.eval_shape(discover, target.params, batches[0], masks[0])
  except _MISFIT_ERRORS as error:
    raise misfit_error(0, batches[0], error) from None
  return seen


def check_data_options(mesh, microbatch) -> None:
  """Raises ValueError on a mesh or microbatch that cannot split the batches."""
  check_mesh(mesh)
  if mesh is not None and DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh must have an axis named {DATA_AXIS!r} to split the "
                     f"calibration batches over; its axes are {tuple(mesh.axis_names)}.")
  if microbatch is not None and (isinstance(microbatch, (bool, np.bool_)) or not isinstance(
      microbatch, (int, np.integer)) or microbatch < 1):
    raise ValueError(f"microbatch must be None or an integer >= 1, got {microbatch!r}.")
  if mesh is not None and microbatch is None and mesh.shape[DATA_AXIS] > 1:
    raise ValueError(
        f"With a mesh of {mesh.shape[DATA_AXIS]} devices on {DATA_AXIS!r}, pass "
        "microbatch (examples per device and step): it fixes the order of the Gram sums, "
        "so that the result equals a call without the mesh and the same microbatch.")


def check_row_masks(row_masks, batches):
  if row_masks is None:
    return [None] * len(batches)
  masks = [jnp.asarray(mask) for mask in row_masks]
  if len(masks) != len(batches):
    raise ValueError(f"row_masks has {len(masks)} masks for {len(batches)} calibration "
                     f"batches; pass one mask per batch.")
  for index, mask in enumerate(masks):
    if mask.ndim < 1:
      raise ValueError(f"row_masks[{index}] must have at least one axis (e.g. the "
                       f"batch), got a scalar.")
    if mask.dtype != jnp.bool_ and not bool(jnp.all((mask == 0) | (mask == 1))):
      raise ValueError(f"row_masks[{index}] must be boolean or 0/1, got dtype "
                       f"{mask.dtype} with other values.")
  return masks


def submit_capture(target, params, paths, batches, masks, programs, microbatch):
  """Starts compiling the Gram fold of ``paths`` for the first batch's steps
  (without a mesh; other signatures compile when first met)."""
  capture, _ = capture_fn(target, set(paths))
  step = next(_steps(batches[0], masks[0], microbatch, None))
  acc = jax.eval_shape(capture, params, *step)
  programs.submit(_fold_key(target, paths, None, acc, step), _fold_fn(capture, None), acc,
                  params, *step, donate_argnums=(0,))


def _fold_key(target, paths, mesh, acc, step):
  return ("capture", getattr(target, "program_key", None), tuple(paths), mesh) + (
      programs_lib.signature(acc, step))


def _fold_fn(capture, mesh):
  """The program of one step of the Gram sum: ``(acc, params, batch, mask) ->
  acc + Grams of the batch`` (with a mesh also ``valid``, see below).

  Every microbatch's Grams are added to the running sum in calibration order,
  one after another, so the float sum has one order whatever the mesh. With a
  mesh of ``D`` devices on the ``batch`` axis, device ``d`` captures the
  step's ``d``-th microbatch; the running sum (one slot per device, ``acc`` of
  shape ``(D, ...)``) then travels from device ``D - 1`` to 0, 1, ...,
  ``D - 1``, each adding its microbatch's Grams where ``valid``: the sum ends
  on device ``D - 1``.
  """
  if mesh is None:
    def fold(acc, params, batch, mask):
      return _add_each(acc, capture(params, batch, mask))
    return fold
  devices = mesh.shape[DATA_AXIS]

  def local(acc, params, batch, mask, valid):
    grams = capture(params, batch, mask)
    running = jax.tree.map(lambda a: a[0], acc)
    index = jax.lax.axis_index(DATA_AXIS)
    for device in range(devices):
      source = (device - 1) % devices
      if source != device:
        running = jax.lax.ppermute(running, DATA_AXIS, [(source, device)])
      running = jax.lax.cond((index == device) & valid[0],
                             lambda r: _add_each(r, grams), lambda r: r, running)
    return jax.tree.map(lambda a: a[None], running)

  split, replicated = jax.sharding.PartitionSpec(DATA_AXIS), jax.sharding.PartitionSpec()
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(split, replicated, split, split, split),
                       out_specs=split, check_vma=False)


def _add_each(acc, grams):
  """``acc + grams`` leaf by leaf. A barrier keeps each add out of its Gram's
  own fusion (so it rounds alike in every program), and lets each layer's Gram
  be freed once added, before the next one is computed."""
  return jax.tree.map(lambda a, g: a + jax.lax.optimization_barrier(g), acc, grams)


def _steps(batch, mask, microbatch, mesh):
  """The steps of one calibration batch: ``(batch, mask)``, or with a mesh
  ``(batch, mask, valid)`` of ``D`` microbatches on the mesh's ``batch`` axis.

  A batch of ``n`` examples is cut into microbatches of ``microbatch``
  examples (all of it when None). With a mesh, a last step of fewer than ``D``
  microbatches is filled with copies of its first one, marked not ``valid``.
  Every process reads the rows of its own devices from the (same) host batch.
  """
  if microbatch is None and mesh is None:
    yield batch, mask
    return
  leaves = jax.tree.leaves((batch, mask))
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("With microbatch, every array of a calibration batch (and its row "
                     "mask) must have the examples on its first axis, all of one length; "
                     f"got first axes {sorted(map(str, sizes))}.")
  size = sizes.pop()
  microbatch = size if microbatch is None else microbatch
  if size % microbatch:
    raise ValueError(f"A calibration batch of {size} examples does not split into "
                     f"microbatches of {microbatch}; use batch sizes that are multiples of "
                     f"microbatch.")
  # Sliced on the host: eager device slices would compile once per offset.
  host = jax.tree.map(np.asarray, (batch, mask))
  if mesh is None:
    for start in range(0, size, microbatch):
      yield jax.tree.map(lambda a, s=start: a[s:s + microbatch], host)
    return
  devices = mesh.shape[DATA_AXIS]
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
  put = lambda a: jax.make_array_from_callback(a.shape, split, lambda index: a[index])
  for start in range(0, size, microbatch * devices):
    rows = start + np.arange(microbatch * devices)
    valid = start + microbatch * np.arange(devices) < size
    rows = np.where(rows < size, rows, start)
    yield jax.tree.map(lambda a, rows=rows: put(a[rows]), host) + (put(valid),)


def accumulate_grams(target, params, paths, batches, masks, programs, mesh=None,
                microbatch=None, check_batches=True):
  """``({path: (gram, count)}, seconds)``: the Grams of ``paths`` over all batches
  (see :func:`_fold_fn`), one compiled step per signature (compilation not in
  ``seconds``). With a mesh the result is replicated over it. ``check_batches``
  runs :func:`check_batch` on each batch as it is read (the first pass over the
  batches needs it; later passes read the same data)."""
  first_layer = paths_lib.path_name(paths[0]) if paths else None

  def steps():
    for index, (batch, mask) in enumerate(zip(batches, masks, strict=True)):
      if check_batches:
        check_batch(index, batch, batches[0] if index else batch, first_layer)
      for step in _steps(batch, mask, microbatch, mesh):
        yield step, (index, batch)

  return fold_steps(target, params, paths, steps(), programs, mesh)


def model_steps(batches, masks, microbatch, mesh):
  """Every step of every calibration batch (see :func:`_steps`), in order."""
  for batch, mask in zip(batches, masks, strict=True):
    yield from _steps(batch, mask, microbatch, mesh)


def fold_steps(target, params, paths, steps, programs, mesh=None):
  """:func:`accumulate_grams` over given ``(step, source)`` pairs: a step is
  ``(batch, mask)``, or with a mesh ``(batch, mask, valid)`` split over its
  ``batch`` axis; ``source`` is ``(index, batch)`` of the calibration batch it
  comes from (named when it does not fit the model), or None."""
  capture, _ = capture_fn(target, set(paths))
  fold = _fold_fn(capture, mesh)
  if mesh is not None:
    params = jax.device_put(params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
  acc, seconds = None, 0.0
  for step, source in steps:
    try:
      if acc is None:
        acc = _zero_grams(jax.eval_shape(capture, params, *step[:2]), mesh)
      program = programs.get(_fold_key(target, paths, mesh, acc, step), fold, acc, params, *step,
                             donate_argnums=(0,))
    except _MISFIT_ERRORS as error:
      if source is None:
        raise
      raise misfit_error(*source, error) from None
    start = time.perf_counter()
    acc = jax.block_until_ready(program(acc, params, *step))
    seconds += time.perf_counter() - start
  if mesh is not None:
    acc = _last_device_slot(acc, mesh)
  return acc, seconds


def _zero_grams(shapes, mesh):
  """Zeros shaped like the Grams; with a mesh one slot per device of its
  ``batch`` axis, ``(D, ...)`` split over it."""
  leaves, treedef = jax.tree.flatten(shapes)
  sharding = None
  if mesh is not None:
    leaves = [jax.ShapeDtypeStruct((mesh.shape[DATA_AXIS],) + s.shape, s.dtype)
              for s in leaves]
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
  return _zeros(treedef, tuple((s.shape, jnp.dtype(s.dtype)) for s in leaves), sharding)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(treedef, shapes, sharding):
  """One program (cached across calls) for all the zeros of a Gram tree."""
  leaves = [jnp.zeros(shape, dtype) for shape, dtype in shapes]
  if sharding is not None:
    leaves = jax.lax.with_sharding_constraint(leaves, sharding)
  return jax.tree.unflatten(treedef, leaves)


def _last_device_slot(acc, mesh):
  """The running sum's slot of the last device, replicated over the mesh."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda acc: jax.tree.map(lambda a: a[-1], acc),
                 out_shardings=replicated)(acc)


def layer_grams(model_or_apply: Any, variables, calibration_batches: Sequence[Any], *,
                row_masks: Optional[Sequence[Any]] = None,
                mesh: Optional[jax.sharding.Mesh] = None,
                microbatch: Optional[int] = None, **apply_kwargs) -> dict:
  """The Gram of every supported linear layer's input rows, as ``quantize_model``
  accumulates them.

  Args:
    model_or_apply, variables, calibration_batches, row_masks, mesh,
      microbatch, **apply_kwargs: as in :func:`quantize_model` (the Grams
      are bitwise equal with and without a mesh, for one ``microbatch``).

  Returns:
    ``{path: GramAccumulator}`` in forward order, ``path`` ``/``-joined; the
    Gram is ``(groups, d_in, d_in)`` float32 over the layer's 2-D view and
    ``count`` the number of unmasked rows. Layers without a 2-D view are
    left out.
  """
  check_data_options(mesh, microbatch)
  target = model_adapter(model_or_apply, variables, apply_kwargs)
  batches = as_sequence(calibration_batches)
  masks = check_row_masks(row_masks, batches)
  seen = discover_layers(target, batches, masks)
  paths = [layer.path for layer in seen.values() if layer.view is not None]
  with programs_lib.Programs() as programs:
    grams, _ = accumulate_grams(target, target.params, paths, batches, masks, programs, mesh,
                           microbatch)
  return {paths_lib.path_name(path): GramAccumulator(*grams[path]) for path in paths}


def check_mesh(mesh) -> None:
  """Raises ValueError unless ``mesh`` is None or a ``jax.sharding.Mesh``."""
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got "
                     f"{type(mesh).__name__}.")
