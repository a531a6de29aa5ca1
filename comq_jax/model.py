"""COMQ over a whole Flax (linen) model: capture inputs, solve, write back.

Reference: Zhang et al., arXiv 2403.07134 (2024). The official code quantizes
``nn.Linear`` layers one by one from inputs of the full-precision model; conv
layers use the standard im2col reduction (each group of a grouped conv is an
independent linear layer).
"""

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import logging
import flax
from flax import linen as nn
import jax
import jax.numpy as jnp

from comq_jax import grid as grid_lib
from comq_jax import layer as layer_lib
from inq_jax import im2col

INPUTS = ("fp", "sequential")


class LayerReport(NamedTuple):
  """One quantized layer: module path, kernel shape, bits, COMQ and RTN
  errors ``||X W - X W_q||_F`` (summed over groups) and solve time (s)."""
  path: str
  shape: tuple
  bits: int
  error: float
  rtn_error: float
  seconds: float


def _grouped_inputs(module, inputs):
  """Layer inputs as rows ``(rows, groups, features per group)``."""
  if isinstance(module, nn.Conv):
    patches = im2col.conv_patches(module, inputs)
    groups = module.feature_group_count
    return patches.reshape(-1, groups, patches.shape[-1] // groups)
  return inputs.reshape(-1, 1, inputs.shape[-1])


def _grouped_kernel(module, kernel):
  if isinstance(module, nn.Conv):
    return im2col.conv_kernel_matrix(kernel, module.feature_group_count)
  return kernel[None]


@jax.jit
def _group_gram(x):
  x = x.astype(jnp.float32)
  return jnp.einsum("rgf,rgh->gfh", x, x,
                    precision=jax.lax.Precision.HIGHEST)


class _Stop(Exception):
  """Ends a forward pass once every requested input has been captured."""


def _is_layer_call(context) -> bool:
  """Whether an intercepted call is a Dense/Conv layer that COMQ quantizes."""
  return (context.method_name == "__call__"
          and type(context.module) in (nn.Dense, nn.Conv))


def _apply_fn(model_or_apply):
  return (model_or_apply.apply if isinstance(model_or_apply, nn.Module)
          else model_or_apply)


def layer_paths(model_or_apply: Any, variables, batch,
                **apply_kwargs) -> list:
  """``/``-joined paths of the layers :func:`quantize_model` visits, in order.

  Traces one forward pass on shapes only (``jax.eval_shape``), e.g. to build
  a ``skip`` predicate for the first and last layers.
  """
  paths = []

  def record(next_fun, args, kwargs, context):
    if _is_layer_call(context):
      path = _path_name(context.module.path)
      if path not in paths:
        paths.append(path)
    return next_fun(*args, **kwargs)

  apply_fn = _apply_fn(model_or_apply)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: apply_fn(v, x, **apply_kwargs), variables,
                   batch)
  return paths


def _capture(apply_fn, variables, batches, apply_kwargs, targets):
  """Forward passes that accumulate the grouped Gram of each layer input.

  Args:
    targets: module paths to capture, or None for every Dense/Conv.

  Returns:
    ``(order, grams, modules)``: paths in first-call order, ``path ->
    (g, F, F)`` Gram and ``path -> module`` (a bound clone).
  """
  order, grams, modules = [], {}, {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if _is_layer_call(context) and (targets is None or mod.path in targets):
      path = mod.path
      g = _group_gram(_grouped_inputs(mod, args[0]))
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


def _path_name(path):
  return "/".join(path)


def _solve_layer(module, kernel, gram, options):
  """COMQ and RTN for every group of one layer; returns kernel and errors."""
  mats = _grouped_kernel(module, kernel).astype(
      layer_lib.compute_dtype(kernel.dtype))
  rtn_options = {k: options[k] for k in ("bits", "grid", "granularity",
                                        "scalar")}
  solve = jax.vmap(lambda w, h: layer_lib.solve(w.T, h, **options))
  qt, _, _, err, _ = solve(mats, gram)

  def rtn_error(w, h):
    q, _, _ = layer_lib.rtn_solve(w.T, **rtn_options)
    return layer_lib.reconstruction_error(w, q.T, h)

  rtn_err = jax.vmap(rtn_error)(mats, gram)
  q = jnp.transpose(qt, (0, 2, 1))
  if isinstance(module, nn.Conv):
    new_kernel = im2col.kernel_from_matrix(q, kernel.shape)
  else:
    new_kernel = q[0]
  total = lambda e: float(jnp.sqrt(jnp.sum(e * e)))
  return new_kernel.astype(kernel.dtype), total(err), total(rtn_err)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def quantize_model(model_or_apply: Any, variables, calibration_batches:
                   Sequence[Any], *, bits: int, iters: int = 1,
                   order: str = "greedy", scale_update: bool = False,
                   scalar: float = 1.0, grid: str = "asymmetric",
                   granularity: str = "channel",
                   skip: Optional[Callable[[str, Any], bool]] = None,
                   inputs: str = "fp", **apply_kwargs):
  """Quantizes every ``nn.Dense`` / ``nn.Conv`` kernel of a model with COMQ.

  Layers are found and their inputs captured with ``nn.intercept_methods``
  (the model is not rewritten), in the order of their first call. For each
  layer the Gram ``H = X^T X`` of its inputs is accumulated over all
  calibration batches and :func:`comq_jax.layer.quantize_layer` is solved
  (conv layers via im2col, one solve per feature group, vmapped). Biases,
  BatchNorm parameters and ``batch_stats`` are left in float.

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
    bits, iters, order, scale_update, scalar, grid, granularity: as in
      :func:`comq_jax.layer.quantize_layer` (``"layer"`` granularity shares a
      scale per feature group).
    skip: optional predicate ``skip(path, kernel) -> bool`` with ``path`` the
      module path as a ``/``-joined string (e.g. ``"Dense_0"``,
      ``"block1/conv2"``); skipped layers stay in float.
    inputs: ``"fp"`` or ``"sequential"``.
    **apply_kwargs: passed to every apply call (e.g. ``train=False``).

  Returns:
    ``(new_variables, reports)``: variables with quantized kernels (same tree,
    shapes and dtypes) and a list of :class:`LayerReport` in forward order.
  """
  grid_lib.check_options(bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar)
  if inputs not in INPUTS:
    raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}.")
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"iters must be an integer >= 1, got {iters!r}.")
  if order not in layer_lib.ORDERS:
    raise ValueError(
        f"order must be one of {layer_lib.ORDERS}, got {order!r}.")
  if "params" not in variables:
    raise ValueError("variables must contain a 'params' collection.")
  apply_fn = _apply_fn(model_or_apply)
  batches = list(calibration_batches)
  if not batches:
    raise ValueError("calibration_batches is empty.")
  options = dict(bits=bits, iters=iters, order=order,
                 scale_update=bool(scale_update), scalar=float(scalar),
                 grid=grid, granularity=granularity)

  layer_order, grams, modules = _capture(apply_fn, variables, batches,
                                         apply_kwargs, None)
  params = flax.core.unfreeze(variables["params"])
  new_variables = dict(variables)
  new_variables["params"] = params
  todo = [p for p in layer_order
          if skip is None or not skip(_path_name(p),
                                      _get(params, p)["kernel"])]
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
                                            grams[path], options)
    jax.block_until_ready(new_kernel)
    seconds = time.perf_counter() - start
    leaf["kernel"] = new_kernel
    name = _path_name(path)
    reports.append(LayerReport(path=name, shape=tuple(kernel.shape),
                               bits=bits, error=err, rtn_error=rtn_err,
                               seconds=seconds))
    logging.info("COMQ %d/%d %s %s: error %.4g (RTN %.4g), %.2fs",
                 index + 1, len(todo), name, tuple(kernel.shape), err,
                 rtn_err, seconds)
  return new_variables, reports
