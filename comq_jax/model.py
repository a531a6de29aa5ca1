"""Post-training quantization of a whole Flax model (linen or NNX), layer by layer.

Layers are found with :mod:`inq_jax.layers` (interception, the model is not
rewritten). One jitted forward pass per calibration batch accumulates the Gram
``H = X^T X`` of every layer's input rows; then a layer solver runs on each
Gram: COMQ (:func:`comq_jax.quantize_layer`), GPTQ or round-to-nearest on the
same grid. Solves are compiled once per distinct layer signature (matrix
shapes, dtype and options), so repeated blocks share one compilation.

Reference: Zhang et al., arXiv 2403.07134 (2024). The official code quantizes
``nn.Linear`` layers one by one from inputs of the full-precision model; conv
layers use the standard im2col reduction (each group of a grouped conv is an
independent linear layer).
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
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
  """Where :func:`quantize_model` spent its time (seconds).

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
      one capture per batch signature (per layer with
      ``inputs="sequential"``), one solve per distinct layer signature, and
      any small program not already cached by an earlier call.
  """
  capture_seconds: float
  compile_seconds: float
  compile_wait_seconds: float
  solve_seconds: float
  compilations: int


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
  counts as compile time too.
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
    self._futures = {}
    self._lock = threading.Lock()
    self.compile_seconds = 0.0
    self.wait_seconds = 0.0

  def _compile(self, lowered):
    start = time.perf_counter()
    program = lowered.compile()
    with self._lock:
      self.compile_seconds += time.perf_counter() - start
    return program

  def submit(self, key, fn, *args):
    """Traces ``fn`` for arguments shaped like ``args`` (here: tracing is not
    thread-safe for every Flax transform) and starts compiling it."""
    if key not in self._futures:
      shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                            args)
      self._futures[key] = self._pool.submit(self._compile, jax.jit(fn).lower(*shapes))

  def get(self, key, fn, *args):
    """The program of ``key`` (compiled from ``fn`` if never submitted)."""
    self.submit(key, fn, *args)
    start = time.perf_counter()
    program = self._futures[key].result()
    self.wait_seconds += time.perf_counter() - start
    return program

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._pool.shutdown(wait=True, cancel_futures=True)
    return False


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


def _solve_fn(method, options):
  """``(mats, gram) -> (quantized mats, errors, RTN errors, positive definite)``,
  for ``mats`` of shape ``(groups, d_in, d_out)`` and Grams ``(groups, d_in, d_in)``."""
  grid_options = {k: options[k] for k in ("bits", "grid", "granularity", "scalar",
                                         "group_size")}

  def rtn(w, h):
    q, _, _ = baselines.rtn_solve(w.T, **grid_options)
    return q, objective.reconstruction_error(w, q.T, h)

  def over_groups(fn, mats, gram):
    # A single matrix skips vmap: tracing its batching rules costs as much as
    # tracing the solve.
    if mats.shape[0] == 1:
      return jax.tree.map(lambda a: a[None], fn(mats[0], gram[0]))
    return jax.vmap(fn)(mats, gram)

  def solve(mats, gram):
    qt, rtn_err = over_groups(rtn, mats, gram)
    err, positive_definite = rtn_err, jnp.asarray(True)
    if method == "comq":
      comq_options = {k: options[k] for k in ("iters", "order", "scale_update", "init")}
      comq = lambda w, h: layer_lib.solve(w.T, h, **grid_options, **comq_options)
      qt, _, _, err, _ = over_groups(comq, mats, gram)
    elif method == "gptq":
      gptq_options = {k: options[k] for k in ("block_size", "damp", "act_order",
                                             "static_groups")}
      gptq = lambda w, h: baselines.gptq_solve(w.T, h, **grid_options, **gptq_options)
      qt, _, _, err, positive = over_groups(gptq, mats, gram)
      positive_definite = jnp.all(positive)
    return jnp.transpose(qt, (0, 2, 1)), err, rtn_err, positive_definite

  return solve


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
    return [(mats, gram)]
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
                   inputs: str = "fp", **apply_kwargs) -> ModelQuantization:
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
    **apply_kwargs: passed to every apply call (e.g. ``train=False``).

  Returns:
    A :class:`ModelQuantization`.

  Raises:
    ValueError: for bad options, empty calibration data, a row mask of the
      wrong shape or one that leaves a layer without rows, an unsupported
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
  target = _target(model_or_apply, variables, apply_kwargs)
  batches = list(calibration_batches)
  if not batches:
    raise ValueError("calibration_batches is empty.")
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
    solve_fn = _solve_fn(method, options)
    solve_key = lambda args: ("solve", method, tuple(sorted(options.items()))
                              ) + _signature(*args)
    if inputs == "fp":
      # The capture runs first: its compilation goes ahead of the solves'.
      _submit_captures(target, params, [layer.path for layer in todo], batches, masks,
                       programs)
    for layer in todo:
      shapes = _solve_shapes(layer.view, _get(params, layer.path)["kernel"].dtype)
      programs.submit(solve_key(shapes), solve_fn, *shapes)

    def capture(paths):
      nonlocal capture_seconds
      grams, seconds = _accumulate(target, params, paths, batches, masks, programs)
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
    # written back in layer order.
    in_flight = _SOLVES_IN_FLIGHT if inputs == "fp" else 1
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
        chunks = _group_chunks(mats, np.asarray(gram))
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
                    solve_seconds=solve_seconds, compilations=compilations[0])
  return ModelQuantization(variables=new_variables, layers=reports, skipped=skipped,
                           settings=dict(options, method=method, inputs=inputs),
                           timings=timings, model=new_model)


def _submit_captures(target, params, paths, batches, masks, programs):
  """Starts compiling the capture of ``paths`` for every batch signature; returns
  ``(program key, fn)`` per batch."""
  fn, _ = _capture_fn(target, set(paths))
  keyed = []
  for batch, mask in zip(batches, masks, strict=True):
    key = ("capture", tuple(paths)) + _signature(batch, mask)
    programs.submit(key, fn, params, batch, mask)
    keyed.append((key, fn))
  return keyed


def _accumulate(target, params, paths, batches, masks, programs):
  """``({path: (gram, count)}, seconds)``: the Grams of ``paths`` over all batches,
  one compiled capture per batch signature (compilation not in ``seconds``)."""
  keyed = _submit_captures(target, params, paths, batches, masks, programs)
  totals, seconds = None, 0.0
  for (key, fn), batch, mask in zip(keyed, batches, masks, strict=True):
    program = programs.get(key, fn, params, batch, mask)
    add = (None if totals is None
           else programs.get(("add",) + _signature(totals), _add, totals, totals))
    start = time.perf_counter()
    grams = program(params, batch, mask)
    totals = grams if add is None else add(totals, grams)
    jax.block_until_ready(totals)
    seconds += time.perf_counter() - start
  return totals, seconds


def layer_grams(model_or_apply: Any, variables, calibration_batches: Sequence[Any], *,
                row_masks: Optional[Sequence[Any]] = None, **apply_kwargs) -> dict:
  """The Gram of every supported linear layer's input rows, as ``quantize_model``
  accumulates them.

  Args:
    model_or_apply, variables, calibration_batches, row_masks, **apply_kwargs:
      as in :func:`quantize_model`.

  Returns:
    ``{path: GramAccumulator}`` in forward order, ``path`` ``/``-joined; the
    Gram is ``(groups, d_in, d_in)`` float32 over the layer's 2-D view and
    ``count`` the number of unmasked rows. Layers without a 2-D view are
    left out.
  """
  target = _target(model_or_apply, variables, apply_kwargs)
  batches = list(calibration_batches)
  if not batches:
    raise ValueError("calibration_batches is empty.")
  masks = _check_masks(row_masks, batches)
  discover, seen = _capture_fn(target, None)
  jax.eval_shape(discover, target.params, batches[0], masks[0])
  paths = [layer.path for layer in seen.values() if layer.view is not None]
  grams, _ = _accumulate(target, target.params, paths, batches, masks, _Programs())
  return {layers.path_name(path): objective.GramAccumulator(*grams[path]) for path in paths}


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


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
