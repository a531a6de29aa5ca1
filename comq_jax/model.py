"""Post-training quantization of a whole Flax (linen) model, layer by layer.

Layers are found with :mod:`inq_jax.layers` (interception, the model is not
rewritten); for each one the Gram ``H = X^T X`` of its inputs is accumulated
over the calibration batches and a layer solver runs on it: COMQ
(:func:`comq_jax.quantize_layer`) or round-to-nearest on the same grid.

Reference: Zhang et al., arXiv 2403.07134 (2024). The official code quantizes
``nn.Linear`` layers one by one from inputs of the full-precision model; conv
layers use the standard im2col reduction (each group of a grouped conv is an
independent linear layer).
"""

import logging
import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp

from comq_jax import baselines
from comq_jax import grid as grid_lib
from comq_jax import layer as layer_lib
from comq_jax import objective
from inq_jax import layers
from inq_jax.deploy.packing import SizeReport

INPUTS = ("fp", "sequential")
METHODS = ("comq", "gptq", "rtn")

PyTree = Any

_LOG = logging.getLogger(__name__)


class LayerReport(NamedTuple):
  """One quantized layer: module path, kernel shape, bits, the method's and
  round-to-nearest's errors ``||X W - X W_q||_F`` (summed over groups) and
  solve time (s)."""
  path: str
  shape: tuple
  bits: int
  error: float
  rtn_error: float
  seconds: float


class ModelQuantization(NamedTuple):
  """Result of :func:`quantize_model`: the model and what was done to it.

  Attributes:
    variables: the variables with quantized kernels (same tree, shapes and
      dtypes as the input).
    layers: one :class:`LayerReport` per quantized layer, in forward order.
    skipped: paths of the linear layers left in float by ``skip``.
    settings: the method and grid settings used (``method``, ``bits``,
      ``grid``, ``granularity``, ``scalar`` and the solver options), so that
      later calls never take them again.
  """
  variables: PyTree
  layers: list
  skipped: list
  settings: dict

  def quantized_mask(self) -> PyTree:
    """Bool pytree over ``variables["params"]``: the quantized kernels."""
    return layers.kernel_mask(self.variables["params"],
                              [report.path for report in self.layers])

  def size_report(self) -> SizeReport:
    """Bytes of the model with its quantized kernels stored as codes.

    A quantized kernel takes ``ceil(bits * size / 8)`` bytes of codes plus
    its grid parameters (:func:`comq_jax.grid.parameter_bytes`: per layer,
    per output channel, or per output channel and group of its ``d_in =
    size / d_out`` inputs); every other
    leaf counts in its own dtype. ``codebook_bytes`` is the
    information-theoretic size, ``log2(levels)`` bits per weight.
    ``entropy_bytes`` is None (not measured).
    """
    bits, grid = self.settings["bits"], self.settings["grid"]
    granularity = self.settings["granularity"]
    group_size = self.settings["group_size"]
    quantized = {"params": self.quantized_mask()}
    for name, collection in self.variables.items():
      if name != "params":
        quantized[name] = jax.tree.map(lambda _: False, collection)
    fp32 = packed = codebook = 0
    quantized_size = total = 0
    for leaf, is_quantized in zip(jax.tree.leaves(self.variables),
                                  jax.tree.leaves(quantized), strict=True):
      size = int(jnp.size(leaf))
      fp32 += 4 * size
      total += size
      if not is_quantized:
        own = size * jnp.asarray(leaf).dtype.itemsize
        packed += own
        codebook += own
        continue
      quantized_size += size
      d_in = size // leaf.shape[-1]
      num_grids = {"layer": 1, "channel": leaf.shape[-1],
                   "group": leaf.shape[-1] * grid_lib.num_groups(d_in, group_size)}
      grid_bytes = grid_lib.parameter_bytes(grid, num_grids[granularity])
      packed += math.ceil(bits * size / 8) + grid_bytes
      codebook += size * math.log2(grid_lib.num_levels(bits, grid)) / 8 + grid_bytes
    return SizeReport(fp32_bytes=fp32, packed_bytes=packed,
                      codebook_bytes=codebook, entropy_bytes=None,
                      quantized_fraction=quantized_size / total if total else 0.0)


@jax.jit
def _group_gram(x):
  x = x.astype(jnp.float32)
  return jnp.einsum("rgf,rgh->gfh", x, x,
                    precision=jax.lax.Precision.HIGHEST)


class _Stop(Exception):
  """Ends a forward pass once every requested input has been captured."""


def _capture(apply_fn, variables, batches, apply_kwargs, targets):
  """Forward passes that accumulate the grouped Gram of each layer input.

  Args:
    targets: module paths to capture, or None for every linear layer.

  Returns:
    ``(order, grams, modules)``: paths in first-call order, ``path ->
    (g, F, F)`` Gram and ``path -> module`` (a bound clone).
  """
  order, grams, modules = [], {}, {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if layers.is_linear_call(context) and (targets is None
                                           or mod.path in targets):
      path = mod.path
      g = _group_gram(layers.grouped_inputs(mod, args[0]))
      if path not in grams:
        order.append(path)
        modules[path] = mod
        grams[path] = g
      else:
        grams[path] = grams[path] + g
      if targets is not None and all(t in grams for t in targets):
        raise _Stop
    return next_fun(*args, **kwargs)

  for batch in batches:
    try:
      with nn.intercept_methods(interceptor):
        apply_fn(variables, batch, **apply_kwargs)
    except _Stop:
      pass
  return order, grams, modules


def _solve_layer(module, kernel, gram, method, options):
  """The method and RTN for every group of one layer; kernel and errors."""
  mats = layers.grouped_kernel(module, kernel).astype(
      objective.compute_dtype(kernel.dtype))
  grid_options = {k: options[k] for k in ("bits", "grid", "granularity", "scalar",
                                         "group_size")}

  def rtn(w, h):
    q, _, _ = baselines.rtn_solve(w.T, **grid_options)
    return q, objective.reconstruction_error(w, q.T, h)

  qt, rtn_err = jax.vmap(rtn)(mats, gram)
  err = rtn_err
  if method == "comq":
    comq_options = {k: options[k] for k in ("iters", "order", "scale_update", "init")}
    solve = jax.vmap(lambda w, h: layer_lib.solve(w.T, h, **grid_options,
                                                  **comq_options))
    qt, _, _, err, _ = solve(mats, gram)
  elif method == "gptq":
    gptq_options = {k: options[k] for k in ("block_size", "damp", "act_order",
                                           "static_groups")}
    solve = jax.vmap(lambda w, h: baselines.gptq_solve(w.T, h, **grid_options,
                                                       **gptq_options))
    qt, _, _, err, positive_definite = solve(mats, gram)
    if not bool(jnp.all(positive_definite)):
      raise ValueError(f"{layers.path_name(module.path)}: H is not positive definite "
                       f"after damping with damp={options['damp']}; raise damp.")
  q = jnp.transpose(qt, (0, 2, 1))
  new_kernel = layers.kernel_from_grouped(module, q, kernel.shape)
  total = lambda e: float(jnp.sqrt(jnp.sum(e * e)))
  return new_kernel.astype(kernel.dtype), total(err), total(rtn_err)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def quantize_model(model_or_apply: Any, variables, calibration_batches:
                   Sequence[Any], *, bits: int, method: str = "comq",
                   iters: int = 1, order: str = "greedy",
                   scale_update: bool = False, scalar: float = 1.0,
                   grid: str = "asymmetric", granularity: str = "channel",
                   group_size=None, init: str = "float", block_size: int = 128,
                   damp: float = 0.01, act_order: bool = False,
                   static_groups: bool = False,
                   skip: Optional[Callable[[str, Any], bool]] = None,
                   inputs: str = "fp", **apply_kwargs) -> ModelQuantization:
  """Quantizes every ``nn.Dense`` / ``nn.Conv`` kernel of a model.

  Layers are found and their inputs captured with ``nn.intercept_methods``
  (the model is not rewritten), in the order of their first call. For each
  layer the Gram ``H = X^T X`` of its inputs is accumulated over all
  calibration batches and the layer is solved (conv layers via im2col, one
  solve per feature group, vmapped) with ``method``:

  * ``"comq"``: :func:`comq_jax.quantize_layer` coordinate descent;
  * ``"gptq"``: :func:`comq_jax.gptq_layer`, on the same Grams and grid;
  * ``"rtn"``: round-to-nearest on the same grid (the data only measure the
    error).

  Biases, BatchNorm parameters and ``batch_stats`` are left in float.

  * ``inputs="fp"`` (official code): inputs come from the full-precision
    model, one pass over the batches captures every layer.
  * ``inputs="sequential"``: layer ``l`` sees inputs from the model whose
    layers before ``l`` are already quantized (one pass per layer, stopped
    after the layer); the target is then ``X_q W`` with those inputs.

  Args:
    model_or_apply: a linen ``Module`` (its ``apply`` is used) or an
      ``apply_fn(variables, batch, **apply_kwargs)``.
    variables: the model variables; must contain ``"params"``.
    calibration_batches: iterable of model inputs (re-iterated per layer for
      ``"sequential"``, so pass a list).
    bits, iters, order, scale_update, scalar, grid, granularity, group_size,
      init: as in :func:`comq_jax.quantize_layer` (``"layer"`` granularity
      shares a scale per feature group); ``method="rtn"`` uses only the grid
      options.
    block_size, damp, act_order, static_groups: as in
      :func:`comq_jax.gptq_layer` (``method="gptq"``).
    method: ``"comq"``, ``"gptq"`` or ``"rtn"``.
    skip: optional predicate ``skip(path, kernel) -> bool`` with ``path`` the
      module path as a ``/``-joined string (e.g. ``"Dense_0"``,
      ``"block1/conv2"``); skipped layers stay in float and are listed in
      the result's ``skipped``.
    inputs: ``"fp"`` or ``"sequential"``.
    **apply_kwargs: passed to every apply call (e.g. ``train=False``).

  Returns:
    A :class:`ModelQuantization`.
  """
  grid_lib.check_options(bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar, group_size=group_size)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if inputs not in INPUTS:
    raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}.")
  layer_lib.check_options(iters=iters, order=order, init=init)
  baselines.check_gptq_options(granularity=granularity, block_size=block_size,
                               damp=damp, act_order=act_order,
                               static_groups=static_groups)
  if "params" not in variables:
    raise ValueError("variables must contain a 'params' collection.")
  apply_fn = layers.apply_fn_of(model_or_apply)
  batches = list(calibration_batches)
  if not batches:
    raise ValueError("calibration_batches is empty.")
  options = dict(bits=bits, iters=iters, order=order,
                 scale_update=bool(scale_update), scalar=float(scalar),
                 grid=grid, granularity=granularity, group_size=group_size,
                 init=init, block_size=block_size, damp=float(damp),
                 act_order=bool(act_order), static_groups=bool(static_groups))

  layer_order, grams, modules = _capture(apply_fn, variables, batches,
                                         apply_kwargs, None)
  if not layer_order:
    raise ValueError("The model has no nn.Dense or nn.Conv layer to quantize.")
  params = flax.core.unfreeze(variables["params"])
  new_variables = dict(variables)
  new_variables["params"] = params
  skipped = [p for p in layer_order
             if skip is not None and skip(layers.path_name(p),
                                          _get(params, p)["kernel"])]
  todo = [p for p in layer_order if p not in skipped]
  for path in skipped:
    _LOG.info("%s left in float (skip predicate)", layers.path_name(path))
  reports = []
  for index, path in enumerate(todo):
    if inputs == "sequential" and index > 0:
      _, fresh, _ = _capture(apply_fn, new_variables, batches, apply_kwargs,
                             (path,))
      grams[path] = fresh[path]
    start = time.perf_counter()
    leaf = _get(params, path)
    kernel = leaf["kernel"]
    new_kernel, err, rtn_err = _solve_layer(modules[path], kernel,
                                            grams[path], method, options)
    jax.block_until_ready(new_kernel)
    seconds = time.perf_counter() - start
    leaf["kernel"] = new_kernel
    name = layers.path_name(path)
    reports.append(LayerReport(path=name, shape=tuple(kernel.shape),
                               bits=bits, error=err, rtn_error=rtn_err,
                               seconds=seconds))
    _LOG.info("%s %d/%d %s %s: error %.4g (RTN %.4g), %.2fs",
                 method.upper(), index + 1, len(todo), name,
                 tuple(kernel.shape), err, rtn_err, seconds)
  return ModelQuantization(
      variables=new_variables, layers=reports,
      skipped=[layers.path_name(p) for p in skipped],
      settings=dict(options, method=method, inputs=inputs))
