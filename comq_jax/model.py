"""Post-training quantization of a whole Flax model (linen or NNX), layer by layer.

Layers are found with :mod:`inq_jax.layers` (interception, the model is not
rewritten). One jitted forward pass per calibration batch (or microbatch)
adds to the Gram ``H = X^T X`` of every layer's input rows; then a layer
solver runs on each Gram: COMQ (:func:`comq_jax.quantize_layer`), GPTQ or
round-to-nearest on the same grid. Solves are compiled once per distinct layer
signature (matrix shapes, dtype and options), so repeated blocks share one
compilation. Given a mesh, the forward passes are data-parallel over its
``"batch"`` axis and COMQ solves split output channels over its devices, with
results bitwise equal to one device (see :func:`quantize_model`).

Reference: Zhang et al., arXiv 2403.07134 (2024). The official code quantizes
``nn.Linear`` layers one by one from inputs of the full-precision model; conv
layers use the standard im2col reduction (each group of a grouped conv is an
independent linear layer).
"""

import collections
import collections.abc
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
from flax import nnx
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from comq_jax import baselines
from comq_jax import grid as grid_lib
from comq_jax import layer as layer_lib
from comq_jax import objective
from inq_jax import layers
from inq_jax.deploy.packing import SizeReport

INPUTS = ("fp", "sequential")
METHODS = ("comq", "gptq", "rtn")
ON_UNSUPPORTED = ("error", "skip")

PyTree = Any

_LOG = logging.getLogger(__name__)


class LayerReport(NamedTuple):
  """One quantized layer: module path, kernel shape, bits, the method's and
  round-to-nearest's errors ``||X W - X W_q||_F`` (summed over groups), solve
  time (s, compilation excluded), and ``matrices``: ``(groups, d_in, d_out)``
  of its 2-D view (:mod:`inq_jax.layers`)."""
  path: str
  shape: tuple
  bits: int
  error: float
  rtn_error: float
  seconds: float
  matrices: tuple


class SkippedLayer(NamedTuple):
  """A linear layer left in float: its path, kind (e.g. ``"nn.ConvTranspose"``)
  and why (the skip predicate, an unsupported configuration, no calibration
  rows, or never called on the calibration batches)."""
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
    compile_wait_seconds: wall time spent waiting for the capture's
      compilation.
    solve_seconds: wall time of the solve phase, waits for the solves'
      compilation included (with ``inputs="fp"``, ``_SOLVES_IN_FLIGHT``
      layers solve at a time; with ``"sequential"`` it includes the captures).
    compilations: XLA compilations during the call (``jax.monitoring``):
      one capture step per batch (or microbatch step) signature (per layer with
      ``inputs="sequential"``), one solve per distinct layer signature, and
      any small program not already cached by an earlier call.
    program_bytes: memory, not time: for ``"capture"`` and ``"solve"``, the
      bytes of the largest such program's buffers (arguments, outputs and
      temporaries, less outputs written over donated arguments) as XLA
      assigns them, i.e. what it holds on the device while it runs; empty
      where the backend does not report it.
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
    layers: one :class:`LayerReport` per quantized layer, in forward order.
    skipped: one :class:`SkippedLayer` per linear layer left in float.
    settings: the method and grid settings used (``method``, ``bits``,
      ``grid``, ``granularity``, ``group_size``, ``scalar`` and the solver
      options), so that later calls never take them again.
    timings: a :class:`Timings`, or None (e.g. for a result rebuilt from a
      record).
    model: for an NNX model, a new module with the quantized weights (the
      given module is not changed); None for linen.
  """
  variables: PyTree
  layers: list
  skipped: list
  settings: dict
  timings: Optional[Timings] = None
  model: Any = None

  def quantized_mask(self) -> PyTree:
    """Bool pytree over ``variables["params"]``: the quantized kernels."""
    return layers.kernel_mask(self.variables["params"],
                              [report.path for report in self.layers])

  def size_report(self) -> SizeReport:
    """Bytes of the model with its quantized kernels stored as codes.

    A quantized kernel takes ``ceil(bits * size / 8)`` bytes of codes plus
    its grid parameters (:func:`comq_jax.grid.parameter_bytes`: per layer,
    per output channel, or per output channel and group of its ``d_in``
    inputs, from the layer's 2-D view); every other leaf counts in its own
    dtype. ``codebook_bytes`` is the information-theoretic size,
    ``log2(levels)`` bits per weight. ``entropy_bytes`` is None (not
    measured).
    """
    bits, grid = self.settings["bits"], self.settings["grid"]
    granularity = self.settings["granularity"]
    group_size = self.settings["group_size"]
    views = {report.path: report for report in self.layers}
    fp32 = packed = codebook = 0
    quantized_size = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(self.variables)[0]:
      size = int(jnp.size(leaf))
      fp32 += 4 * size
      total += size
      keys = [layers.path_name([getattr(k, "key", k)]) for k in path]
      report = (views.get(layers.path_name(keys[1:-1]))
                if keys[0] == "params" and keys[-1] == "kernel" else None)
      if report is None:
        own = size * jnp.asarray(leaf).dtype.itemsize
        packed += own
        codebook += own
        continue
      quantized_size += size
      groups, d_in, d_out = report.matrices
      num_grids = {"layer": groups, "channel": groups * d_out,
                   "group": groups * d_out * grid_lib.num_groups(d_in, group_size)}
      grid_bytes = grid_lib.parameter_bytes(grid, num_grids[granularity])
      packed += math.ceil(bits * size / 8) + grid_bytes
      codebook += size * math.log2(grid_lib.num_levels(bits, grid)) / 8 + grid_bytes
    return SizeReport(fp32_bytes=fp32, packed_bytes=packed,
                      codebook_bytes=codebook, entropy_bytes=None,
                      quantized_fraction=quantized_size / total if total else 0.0)


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
    self.module_kinds = {}

  def forward(self, params, batch, on_call, grams):
    """The model on ``batch`` with ``params``, ``on_call(call)`` at every linear
    call; a returned ``(gram, count)`` is added to ``grams[call.path]``."""
    kinds = self.module_kinds

    def record_kind(next_fun, args, kwargs, context):
      kinds.setdefault(context.module.path, type(context.module))
      return next_fun(*args, **kwargs)

    def store(call):
      found = on_call(call)
      if found is not None:
        if self._module is not None:
          call.module.sow(_GRAMS, "gram", found)
        else:
          _add_gram(grams, call.path, found)

    variables = dict(self._variables, params=params)
    with nn.intercept_methods(record_kind), \
        nn.intercept_methods(layers.intercept_linear_calls(store)):
      if self._module is None:
        self._apply(variables, batch, **self._kwargs)
        return
      _, state = self._apply(variables, batch, mutable=[_GRAMS], **self._kwargs)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        state.get(_GRAMS, {}), is_leaf=lambda x: isinstance(x, tuple))[0]:
      keys = tuple(k.key for k in path[:-1])
      for found in leaf:
        _add_gram(grams, keys, found)

  def result(self, params):
    return dict(self._variables, params=params), None


# The mesh axis that calibration batches are split over.
_DATA_AXIS = "batch"

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
    self._graphdef, self._param_state, self._rest = nnx.split(model, nnx.Param, ...)
    self._kwargs = apply_kwargs
    self.params = nnx.to_pure_dict(self._param_state)
    self.module_kinds = {tuple(path): type(module)
                         for path, module in nnx.iter_modules(model)}

  def _merge(self, params):
    state = jax.tree.map(lambda leaf: leaf, self._param_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self._graphdef, state, self._rest)

  def forward(self, params, batch, on_call, grams):
    """See :meth:`_LinenModel.forward`."""
    model = self._merge(params)

    def store(call):
      found = on_call(call)
      if found is not None:
        _add_gram(grams, call.path, found)

    with layers.intercept_nnx_linear_calls(model, store):
      model(batch, **self._kwargs)

  def result(self, params):
    return {"params": params}, self._merge(params)


def _target(model_or_apply, variables, apply_kwargs):
  """The model to quantize, linen or NNX."""
  if isinstance(model_or_apply, nnx.Module):
    return _NNXModel(model_or_apply, apply_kwargs)
  return _LinenModel(model_or_apply, variables, apply_kwargs)


class _Layer(NamedTuple):
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


def _capture_fn(target, targets, on_unsupported=None):
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
      seen.setdefault(call.path, _Layer(path=call.path, kind=call.kind, view=call.view,
                                        reason=call.reason, row_shape=row_shape))
      if call.view is None and on_unsupported is not None:
        on_unsupported(call)
      if call.view is None or (targets is not None and call.path not in targets):
        return None
      if mask is None:
        weight, count = None, jnp.asarray(math.prod(row_shape), jnp.float32)
      else:
        weight = _mask_rows(layers.path_name(call.path), mask, row_shape)
        count = jnp.sum(weight)
      return call.view.gram(call.inputs, weight), count

    target.forward(params, batch, on_call, grams)
    return grams

  return capture, seen


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _count_compilations():
  """``with ... as n``: ``n[0]`` counts the XLA compilations inside the block."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    count[0] += event == _COMPILE_EVENT

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


class _Programs:
  """Ahead-of-time compiled programs, one per key.

  ``submit`` compiles in background threads (XLA compilation releases the
  GIL), so the solves of later layers compile while the Grams are captured
  and earlier layers are solved; ``get`` waits for a program. Tracing time
  counts as compile time too. ``program_bytes`` keeps, per kind of key
  (``key[0]``), the largest program's buffers as XLA assigns them.
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
    self._futures = {}
    self._lock = threading.Lock()
    self.compile_seconds = 0.0
    self.wait_seconds = 0.0
    self.program_bytes = {}

  def _compile(self, kind, lowered):
    start = time.perf_counter()
    program = lowered.compile()
    memory = program.memory_analysis()
    with self._lock:
      self.compile_seconds += time.perf_counter() - start
      if memory is not None:
        footprint = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                     + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        self.program_bytes[kind] = max(self.program_bytes.get(kind, 0), footprint)
    return program

  def submit(self, key, fn, *args, donate_argnums=()):
    """Traces ``fn`` for arguments shaped (and, on a mesh, sharded) like
    ``args`` (here: tracing is not thread-safe for every Flax transform) and
    starts compiling it."""
    if key not in self._futures:
      shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          jnp.shape(a), jnp.result_type(a), sharding=_mesh_sharding(a)), args)
      lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*shapes)
      self._futures[key] = self._pool.submit(self._compile, key[0], lowered)

  def get(self, key, fn, *args, donate_argnums=()):
    """The program of ``key`` (compiled from ``fn`` if never submitted)."""
    self.submit(key, fn, *args, donate_argnums=donate_argnums)
    start = time.perf_counter()
    program = self._futures[key].result()
    self.wait_seconds += time.perf_counter() - start
    return program

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._pool.shutdown(wait=True, cancel_futures=True)
    return False


def _mesh_sharding(a):
  """``a``'s sharding if it is over a mesh, else None (the default device)."""
  sharding = getattr(a, "sharding", None)
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _signature(*trees):
  """A hashable key of the structure, shapes and dtypes of some pytrees of arrays
  (or shape-dtype structs)."""
  leaves, treedef = jax.tree.flatten(trees)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


def _solve_shapes(view, kernel_dtype):
  """Shapes of one call of a layer's solve: ``(mats, gram)`` of a group chunk."""
  groups = 1 if view.groups == 1 else _GROUP_CHUNK
  return (jax.ShapeDtypeStruct((groups, view.d_in, view.d_out),
                               objective.compute_dtype(kernel_dtype)),
          jax.ShapeDtypeStruct((groups, view.d_in, view.d_in), jnp.float32))


def _solve_fn(method, options, mesh=None):
  """``(mats, gram) -> (quantized mats, errors, RTN errors, positive definite)``,
  for ``mats`` of shape ``(groups, d_in, d_out)`` and Grams ``(groups, d_in, d_in)``.

  With a mesh the program runs on every device of it (``jax.shard_map``, inputs
  and outputs replicated), so every device computes exactly what one device
  computes without a mesh, except that COMQ solves of a single matrix split
  its channels over the devices (:func:`comq_jax.layer.solve_on_devices`);
  grouped convs, GPTQ and RTN are computed whole on every device."""
  grid_options = {k: options[k] for k in ("bits", "grid", "granularity", "scalar",
                                         "group_size")}

  def rtn(w, h, split):
    del split
    q, _, _ = baselines.rtn_solve(w.T, **grid_options)
    return q, objective.reconstruction_error(w, q.T, h)

  def over_groups(fn, mats, gram, split=None):
    # A single matrix skips vmap: tracing its batching rules costs as much as
    # tracing the solve. Only it is split over the mesh.
    if mats.shape[0] == 1:
      return jax.tree.map(lambda a: a[None], fn(mats[0], gram[0], split))
    return jax.vmap(lambda w, h: fn(w, h, None))(mats, gram)

  def solve(mats, gram):
    qt, rtn_err = over_groups(rtn, mats, gram)
    err, positive_definite = rtn_err, jnp.asarray(True)
    if method == "comq":
      comq_options = {k: options[k] for k in ("iters", "order", "scale_update", "init")}
      comq = lambda w, h, split: layer_lib.solve_on_devices(
          w.T, h, **grid_options, **comq_options,
          **({} if split is None else dict(axes=split.axis_names,
                                           devices=split.devices.size)))
      qt, _, _, err, _ = over_groups(comq, mats, gram, mesh)
    elif method == "gptq":
      gptq_options = {k: options[k] for k in ("block_size", "damp", "act_order",
                                             "static_groups")}
      gptq = lambda w, h, split: baselines.gptq_solve(w.T, h, **grid_options,
                                                      **gptq_options)
      qt, _, _, err, positive = over_groups(gptq, mats, gram)
      positive_definite = jnp.all(positive)
    return jnp.transpose(qt, (0, 2, 1)), err, rtn_err, positive_definite

  if mesh is None:
    return solve
  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(solve, mesh=mesh, in_specs=replicated, out_specs=replicated,
                       check_vma=False)


# Layers solved at a time when they are independent (inputs="fp"): one solve
# keeps one core busy.
_SOLVES_IN_FLIGHT = 2

# Feature groups solved per call: grouped and depthwise convs of any width share
# one compiled solve per matrix shape.
_GROUP_CHUNK = 32


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


def _stored_kernel_shape(params, path):
  try:
    return tuple(_get(params, path)["kernel"].shape)
  except (KeyError, IndexError, TypeError):
    return None


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _kernel_paths(params):
  """Module paths of every ``kernel`` leaf with ndim >= 2, in tree order."""
  paths = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    if keys and keys[-1] == "kernel" and jnp.ndim(leaf) >= 2:
      paths.append(keys[:-1])
  return paths


def _as_sequence(calibration_batches):
  """The batches as a sequence: a ``Sequence`` as it is (a lazy one stays
  lazy), any other iterable as a list. Raises ValueError when empty."""
  batches = (calibration_batches if isinstance(calibration_batches, collections.abc.Sequence)
             else list(calibration_batches))
  if not batches:
    raise ValueError("calibration_batches is empty.")
  return batches


def check_data_options(mesh, microbatch) -> None:
  """Raises ValueError on a mesh or microbatch that cannot split the batches."""
  layer_lib.check_mesh(mesh)
  if mesh is not None and _DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh must have an axis named {_DATA_AXIS!r} to split the "
                     f"calibration batches over; its axes are {tuple(mesh.axis_names)}.")
  if microbatch is not None and (isinstance(microbatch, (bool, np.bool_)) or not isinstance(
      microbatch, (int, np.integer)) or microbatch < 1):
    raise ValueError(f"microbatch must be None or an integer >= 1, got {microbatch!r}.")
  if mesh is not None and microbatch is None and mesh.shape[_DATA_AXIS] > 1:
    raise ValueError(
        f"With a mesh of {mesh.shape[_DATA_AXIS]} devices on {_DATA_AXIS!r}, pass "
        "microbatch (examples per device and step): it fixes the order of the Gram sums, "
        "so that the result equals a call without the mesh and the same microbatch.")


def _check_masks(row_masks, batches):
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


def quantize_model(model_or_apply: Any, variables, calibration_batches:
                   Sequence[Any], *, bits: int, method: str = "comq",
                   iters: int = 1, order: str = "greedy",
                   scale_update: bool = False, scalar: float = 1.0,
                   grid: str = "asymmetric", granularity: str = "channel",
                   group_size=None, init: str = "float", block_size: int = 128,
                   damp: float = 0.01, act_order: bool = False,
                   static_groups: bool = False,
                   skip: Optional[Callable[[str, Any], bool]] = None,
                   row_masks: Optional[Sequence[Any]] = None,
                   on_unsupported: str = "error",
                   inputs: str = "fp", mesh: Optional[jax.sharding.Mesh] = None,
                   microbatch: Optional[int] = None, **apply_kwargs) -> ModelQuantization:
  """Quantizes every linear layer of a Flax model (linen or NNX).

  The layer kinds and their 2-D views are those of :mod:`inq_jax.layers`:
  Dense/Linear, DenseGeneral/LinearGeneral, Einsum and Conv (grouped and
  depthwise included), subclasses too. They are found by interception (the
  model is not rewritten). For each layer the Gram ``H = X^T X`` of its input
  rows is accumulated over all calibration batches by one jitted forward
  pass per batch, and every matrix of the layer (one per conv feature group)
  is solved with ``method``:

  * ``"comq"``: :func:`comq_jax.quantize_layer` coordinate descent;
  * ``"gptq"``: :func:`comq_jax.gptq_layer`, on the same Grams and grid;
  * ``"rtn"``: round-to-nearest on the same grid (the data only measure the
    error).

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
  sum travels device to device, see ``_fold_fn``); the COMQ solve of every
  layer with one matrix splits its output channels over all the mesh's
  devices (:func:`comq_jax.quantize_layer`). Each device runs the same
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
    bits, iters, order, scale_update, scalar, grid, granularity, group_size,
      init: as in :func:`comq_jax.quantize_layer` (``"layer"`` granularity
      shares a scale per feature group); ``method="rtn"`` uses only the grid
      options. ``group_size`` counts inputs of the 2-D view (for a conv, of
      its im2col patches).
    method: ``"comq"``, ``"gptq"`` or ``"rtn"``.
    block_size, damp, act_order, static_groups: as in
      :func:`comq_jax.gptq_layer` (``method="gptq"``).
    skip: optional predicate ``skip(path, kernel) -> bool`` with ``path`` the
      module path as a ``/``-joined string (e.g. ``"Dense_0"``,
      ``"block1/conv2"``, ``"layers/0"``); skipped layers stay in float.
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
    **apply_kwargs: passed to every apply call (e.g. ``train=False``).

  Returns:
    A :class:`ModelQuantization`.

  Raises:
    ValueError: for bad options, empty calibration data, a row mask of the
      wrong shape or one that leaves a layer without rows, a mesh without a
      ``"batch"`` axis or a microbatch that does not fit it, an unsupported
      layer with ``on_unsupported="error"``, or a model with no layer left to
      quantize; messages name the layer path.
  """
  grid_lib.check_options(bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar, group_size=group_size)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if inputs not in INPUTS:
    raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}.")
  if on_unsupported not in ON_UNSUPPORTED:
    raise ValueError(f"on_unsupported must be one of {ON_UNSUPPORTED}, got "
                     f"{on_unsupported!r}.")
  layer_lib.check_options(iters=iters, order=order, init=init)
  baselines.check_gptq_options(granularity=granularity, block_size=block_size,
                               damp=damp, act_order=act_order,
                               static_groups=static_groups)
  check_data_options(mesh, microbatch)
  target = _target(model_or_apply, variables, apply_kwargs)
  batches = _as_sequence(calibration_batches)
  masks = _check_masks(row_masks, batches)
  options = dict(bits=bits, iters=iters, order=order,
                 scale_update=bool(scale_update), scalar=float(scalar),
                 grid=grid, granularity=granularity, group_size=group_size,
                 init=init, block_size=block_size, damp=float(damp),
                 act_order=bool(act_order), static_groups=bool(static_groups))
  params = target.params

  with _count_compilations() as compilations, _Programs() as programs:
    def skipped_by_predicate(path):
      return skip is not None and skip(layers.path_name(path), _get(params, path)["kernel"])

    def check_unsupported(call):
      if on_unsupported == "error" and not skipped_by_predicate(call.path):
        raise layers.UnsupportedLayer(
            f"{layers.path_name(call.path)} ({call.kind}): {call.reason}. Pass a skip "
            f"predicate for it, or on_unsupported='skip', to leave it in float.")

    discover, seen = _capture_fn(target, None, check_unsupported)
    jax.eval_shape(discover, params, batches[0], masks[0])
    todo, skipped = _plan(seen, params, target.module_kinds, skipped_by_predicate)
    capture_seconds = 0.0
    solve_fn = _solve_fn(method, options, mesh)
    solve_key = lambda args: ("solve", method, tuple(sorted(options.items()))
                              ) + _signature(*args)
    if inputs == "fp" and mesh is None:
      # The capture runs first: its compilation goes ahead of the solves'.
      _submit_captures(target, params, [layer.path for layer in todo], batches, masks,
                       programs, microbatch)
    for layer in todo:
      shapes = _solve_shapes(layer.view, _get(params, layer.path)["kernel"].dtype)
      programs.submit(solve_key(shapes), solve_fn, *shapes)

    def capture(paths):
      nonlocal capture_seconds
      grams, seconds = _accumulate(target, params, paths, batches, masks, programs,
                                   mesh, microbatch)
      capture_seconds += seconds
      return grams

    grams = capture([layer.path for layer in todo]) if inputs == "fp" else {}
    reports = []
    compile_wait_seconds = programs.wait_seconds
    solve_start = time.perf_counter()

    def run_solve(key, chunks):
      """``(outputs per chunk, seconds)``, compilation wait excluded."""
      solve = programs.get(key, solve_fn, *chunks[0])
      start = time.perf_counter()
      outs = jax.device_get([solve(*chunk) for chunk in chunks])
      return outs, time.perf_counter() - start

    def finish(index, layer, mats, solved):
      name = layers.path_name(layer.path)
      outs, seconds = solved.result()
      q, err, rtn_err = (np.concatenate([out[i] for out in outs])[:len(mats)]
                         for i in range(3))
      if not all(out[3] for out in outs):
        raise ValueError(f"{name}: H is not positive definite after damping with "
                         f"damp={damp}; raise damp.")
      leaf = _get(params, layer.path)
      kernel = leaf["kernel"]
      # device_put: jnp.asarray would compile a staging program per shape.
      leaf["kernel"] = jax.device_put(layer.view.kernel(q).astype(kernel.dtype))
      total = lambda e: float(np.sqrt(np.sum(np.square(e, dtype=np.float64))))
      reports.append(LayerReport(
          path=name, shape=tuple(kernel.shape), bits=bits, error=total(err),
          rtn_error=total(rtn_err), seconds=seconds,
          matrices=(layer.view.groups, layer.view.d_in, layer.view.d_out)))
      _LOG.info("%s %d/%d %s %s: error %.4g (RTN %.4g), %.2fs", method.upper(),
                index + 1, len(todo), name, tuple(kernel.shape), reports[-1].error,
                reports[-1].rtn_error, seconds)

    # A solve runs on one core: with inputs from the FP model, layers are
    # independent and _SOLVES_IN_FLIGHT of them run at a time; results are
    # written back in layer order. On a mesh one at a time: every device (and
    # process) must launch the sharded solves in the same order.
    in_flight = _SOLVES_IN_FLIGHT if inputs == "fp" and mesh is None else 1
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as solver:
      for index, layer in enumerate(todo):
        name = layers.path_name(layer.path)
        if inputs == "sequential":
          grams = capture([layer.path])
        gram, count = grams.pop(layer.path)
        if float(count) == 0:
          if row_masks is not None:
            raise ValueError(f"{name}: the row masks cover zero of its calibration "
                             f"rows; every quantized layer needs at least one unmasked "
                             f"row.")
          skipped.append(SkippedLayer(name, layer.kind, "no calibration rows"))
          _LOG.warning("%s (%s) left in float: no calibration rows", name, layer.kind)
          continue
        kernel = _get(params, layer.path)["kernel"]
        # Reshapes on the host: eager device ops would compile once per shape.
        mats = layer.view.matrices(np.asarray(kernel)).astype(
            objective.compute_dtype(kernel.dtype))
        # On a mesh, solves take host Grams (their programs' inputs are unsharded).
        chunks = _group_chunks(mats, gram if mesh is None else np.asarray(gram))
        pending.append((index, layer, mats, solver.submit(
            run_solve, solve_key(chunks[0]), chunks)))
        if len(pending) >= in_flight:
          finish(*pending.popleft())
      while pending:
        finish(*pending.popleft())
    solve_seconds = time.perf_counter() - solve_start
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
                           settings=dict(options, method=method, inputs=inputs),
                           timings=timings, model=new_model)


def _submit_captures(target, params, paths, batches, masks, programs, microbatch):
  """Starts compiling the Gram fold of ``paths`` for the first batch's steps
  (without a mesh; other signatures compile when first met)."""
  capture, _ = _capture_fn(target, set(paths))
  step = next(_steps(batches[0], masks[0], microbatch, None))
  acc = jax.eval_shape(capture, params, *step)
  programs.submit(_fold_key(paths, None, acc, step), _fold_fn(capture, None), acc,
                  params, *step, donate_argnums=(0,))


def _fold_key(paths, mesh, acc, step):
  return ("capture", tuple(paths), mesh) + _signature(acc, step)


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
  devices = mesh.shape[_DATA_AXIS]

  def local(acc, params, batch, mask, valid):
    grams = capture(params, batch, mask)
    running = jax.tree.map(lambda a: a[0], acc)
    index = jax.lax.axis_index(_DATA_AXIS)
    for device in range(devices):
      source = (device - 1) % devices
      if source != device:
        running = jax.lax.ppermute(running, _DATA_AXIS, [(source, device)])
      running = jax.lax.cond((index == device) & valid[0],
                             lambda r: _add_each(r, grams), lambda r: r, running)
    return jax.tree.map(lambda a: a[None], running)

  split, replicated = jax.sharding.PartitionSpec(_DATA_AXIS), jax.sharding.PartitionSpec()
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
  devices = mesh.shape[_DATA_AXIS]
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_DATA_AXIS))
  put = lambda a: jax.make_array_from_callback(a.shape, split, lambda index: a[index])
  for start in range(0, size, microbatch * devices):
    rows = start + np.arange(microbatch * devices)
    valid = start + microbatch * np.arange(devices) < size
    rows = np.where(rows < size, rows, start)
    yield jax.tree.map(lambda a, rows=rows: put(a[rows]), host) + (put(valid),)


def _accumulate(target, params, paths, batches, masks, programs, mesh=None,
                microbatch=None):
  """``({path: (gram, count)}, seconds)``: the Grams of ``paths`` over all batches
  (see :func:`_fold_fn`), one compiled step per signature (compilation not in
  ``seconds``). With a mesh the result is replicated over it."""
  capture, _ = _capture_fn(target, set(paths))
  fold = _fold_fn(capture, mesh)
  if mesh is not None:
    params = jax.device_put(params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
  acc, seconds = None, 0.0
  for batch, mask in zip(batches, masks, strict=True):
    for step in _steps(batch, mask, microbatch, mesh):
      if acc is None:
        acc = _zero_grams(jax.eval_shape(capture, params, *step[:2]), mesh)
      program = programs.get(_fold_key(paths, mesh, acc, step), fold, acc, params, *step,
                             donate_argnums=(0,))
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
    leaves = [jax.ShapeDtypeStruct((mesh.shape[_DATA_AXIS],) + s.shape, s.dtype)
              for s in leaves]
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_DATA_AXIS))
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
  target = _target(model_or_apply, variables, apply_kwargs)
  batches = _as_sequence(calibration_batches)
  masks = _check_masks(row_masks, batches)
  discover, seen = _capture_fn(target, None)
  jax.eval_shape(discover, target.params, batches[0], masks[0])
  paths = [layer.path for layer in seen.values() if layer.view is not None]
  with _Programs() as programs:
    grams, _ = _accumulate(target, target.params, paths, batches, masks, programs, mesh,
                           microbatch)
  return {layers.path_name(path): objective.GramAccumulator(*grams[path]) for path in paths}


def _plan(seen, params, module_kinds, skipped_by_predicate):
  """The layers to quantize, in forward order, and those left in float."""
  todo, skipped = [], []
  for layer in seen.values():
    name = layers.path_name(layer.path)
    if skipped_by_predicate(layer.path):
      skipped.append(SkippedLayer(name, layer.kind, "skip predicate"))
    elif layer.view is not None:
      todo.append(layer)
    else:
      skipped.append(SkippedLayer(name, layer.kind, layer.reason))
  for path in _kernel_paths(params):
    if path not in seen:
      module_class = module_kinds.get(path)
      kind = module_class.__name__ if module_class else "unknown module"
      if module_class is not None and layers.kind_of_class(module_class) is None:
        reason = f"{kind} is not a supported linear layer kind"
      else:
        reason = ("its kernel was not used by a supported layer's __call__ on the "
                  "calibration batches")
      skipped.append(SkippedLayer(layers.path_name(path), kind, reason))
  if not todo and not skipped:
    raise ValueError("The model has no linear layer to quantize (supported: "
                     + ", ".join(kind.name for kind in layers.KINDS) + ").")
  for entry in skipped:
    log = _LOG.info if entry.reason == "skip predicate" else _LOG.warning
    log("%s (%s) left in float: %s", entry.path, entry.kind, entry.reason)
  return todo, skipped
