"""Which modules of a Flax model are quantizable linear layers, and their 2-D view.

The one definition of "a quantizable layer" shared by INQ's default predicate,
COMQ, round-to-nearest, packing and packed inference:

* a **parameter** view: a leaf named ``kernel`` with ``ndim >= 2``
  (:func:`default_quantizable`), for transforms that see only the params pytree;
* a **module** view: an ``nn.Dense`` or ``nn.Conv`` call, found by
  interception (:func:`is_linear_call`) without rewriting the user's model.
  Its kernel is one or more matrices ``(d_in, d_out)``: a Dense kernel as it
  is, a Conv kernel per feature group over the patches of
  :mod:`inq_jax.im2col` (:func:`grouped_kernel`, :func:`grouped_inputs`).
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from inq_jax import im2col

PyTree = Any
Predicate = Callable[[Any, Any], bool]

LINEAR_MODULES = (nn.Dense, nn.Conv)


def default_quantizable(path, leaf) -> bool:
  """True for Conv and Dense kernels (a leaf named ``kernel``, ndim >= 2).

  Biases, normalisation scales and offsets and batch statistics are left in
  float. The first and last layers are included, as in the INQ paper.
  """
  last = path[-1] if path else None
  return getattr(last, "key", None) == "kernel" and jnp.ndim(leaf) >= 2


def quantizable_mask(params: PyTree,
                     predicate: Optional[Predicate] = None) -> PyTree:
  """A pytree of Python bools parallel to ``params``: the quantizable leaves.

  Args:
    params: a parameter pytree (arrays or shape-dtype structs).
    predicate: ``(key_path, leaf) -> bool``; defaults to
      :func:`default_quantizable`.

  Returns:
    Static bools, usable as an ``optax.masked`` mask.
  """
  predicate = predicate or default_quantizable
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: bool(predicate(path, leaf)), params)


def path_name(module_path: Sequence[str]) -> str:
  """A module path as a ``/``-joined string, e.g. ``"block1/conv2"``."""
  return "/".join(module_path)


def is_linear_call(context) -> bool:
  """Whether an intercepted call is a Dense/Conv layer's ``__call__``."""
  return (context.method_name == "__call__"
          and type(context.module) in LINEAR_MODULES)


def apply_fn_of(model_or_apply: Any) -> Callable:
  """``model.apply`` for a linen module, else the given apply function."""
  return (model_or_apply.apply if isinstance(model_or_apply, nn.Module)
          else model_or_apply)


def layer_paths(model_or_apply: Any, variables, batch,
                **apply_kwargs) -> list:
  """``/``-joined paths of the linear layers of a model, in first-call order.

  Traces one forward pass on shapes only (``jax.eval_shape``).

  Args:
    model_or_apply: a linen ``Module`` or an ``apply_fn(variables, batch,
      **apply_kwargs)``.
    variables: the model variables.
    batch: one model input.
    **apply_kwargs: passed to the apply call (e.g. ``train=False``).

  Returns:
    The paths, e.g. ``["conv1", "block1/conv2", "fc"]``.
  """
  paths = []

  def record(next_fun, args, kwargs, context):
    if is_linear_call(context):
      path = path_name(context.module.path)
      if path not in paths:
        paths.append(path)
    return next_fun(*args, **kwargs)

  apply_fn = apply_fn_of(model_or_apply)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: apply_fn(v, x, **apply_kwargs), variables,
                   batch)
  return paths


def kernel_mask(params: PyTree, paths) -> PyTree:
  """Bool pytree over ``params``: True on the kernel of each module in ``paths``.

  Args:
    params: the params collection of a model.
    paths: ``/``-joined module paths (as in :func:`layer_paths`).
  """
  paths = set(paths)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: (getattr(path[-1], "key", None) == "kernel"
                       and path_name(k.key for k in path[:-1]) in paths),
      params)


def feature_groups(module: nn.Module) -> int:
  """Independent matrices of a layer: a Conv's feature groups, else 1."""
  return module.feature_group_count if isinstance(module, nn.Conv) else 1


def grouped_inputs(module: nn.Module, inputs: jax.Array) -> jax.Array:
  """A layer's inputs as rows ``(rows, groups, d_in per group)``."""
  if isinstance(module, nn.Conv):
    patches = im2col.conv_patches(module, inputs)
    groups = module.feature_group_count
    return patches.reshape(-1, groups, patches.shape[-1] // groups)
  return inputs.reshape(-1, 1, inputs.shape[-1])


def grouped_kernel(module: nn.Module, kernel: jax.Array) -> jax.Array:
  """A layer's kernel as ``(groups, d_in per group, d_out per group)``.

  Row ``i`` of group ``g`` multiplies feature ``i`` of :func:`grouped_inputs`.
  """
  if isinstance(module, nn.Conv):
    return im2col.conv_kernel_matrix(kernel, module.feature_group_count)
  return kernel[None]


def kernel_from_grouped(module: nn.Module, matrices: jax.Array,
                        kernel_shape) -> jax.Array:
  """Inverse of :func:`grouped_kernel` for a kernel of ``kernel_shape``."""
  if isinstance(module, nn.Conv):
    return im2col.kernel_from_matrix(matrices, kernel_shape)
  return matrices[0]
