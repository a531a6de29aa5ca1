"""Inference of an INQ-quantized Flax model through the shift-matmul kernel.

:func:`pack_variables` replaces each quantized kernel in ``variables["params"]``
with a :class:`inq_jax.deploy.PackedPow2`. :func:`packed_apply` runs
``model.apply`` under a Flax method interceptor: every ``nn.Dense`` and
``nn.Conv`` whose ``kernel`` is packed computes its product with
:func:`inq_jax.deploy.shift_matmul`; all other modules run unchanged.

* Dense: ``x @ W + b`` over the last axis of ``x``.
* Conv: :func:`inq_jax.im2col.conv_patches` (same padding, strides and
  dilations as ``nn.Conv``) gives features ordered ``(cin, kh, kw)``; they are
  reordered to ``(kh, kw, cin)``, the row-major order of the packed matrix
  view of the ``(kh, kw, cin, cout)`` kernel, then multiplied. Feature groups,
  masks and circular/causal padding are not supported (ValueError).
* Integer activations: an int8 input to a packed layer takes the exact
  integer path; its output is :func:`inq_jax.deploy.to_float` of the
  exact sum in ``float32`` (one rounding for bits <= 4), plus the bias.
* Float activations: products accumulate in f32 on the matrix units; the
  output has the dtype ``nn.Dense``/``nn.Conv`` would give (``module.dtype``,
  else ``x`` promoted with the parameters).

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from inq_jax import im2col
from inq_jax import layers
from inq_jax.deploy import kernels
from inq_jax.deploy import packing
from inq_jax.incremental import INQState

PyTree = Any


def pack_variables(variables: PyTree, state: INQState, *,
                   k_tile: Optional[int] = None) -> PyTree:
  """Packs the quantized kernels of ``variables["params"]``.

  Args:
    variables: Flax variables (``{"params": ..., "batch_stats": ...}``) after
      INQ with portion 1.
    state: the :class:`inq_jax.INQState` of ``variables["params"]``.
    k_tile: optional ``K`` step for every layer.

  Returns:
    ``variables`` with packed kernels; the other collections are kept.
  """
  out = dict(variables)
  out["params"] = packing.pack_params(variables["params"], state,
                                      k_tile=k_tile)
  return out


def _output_dtype(module: nn.Module, x: jax.Array):
  if module.dtype is not None:
    return module.dtype
  if x.dtype == jnp.int8:
    return jnp.dtype(module.param_dtype)
  return jnp.promote_types(x.dtype, module.param_dtype)


def _product(x: jax.Array, packed: packing.PackedPow2, dtype,
             kernel_options) -> jax.Array:
  """``x @ W`` through the kernel, in ``dtype``."""
  if x.dtype == jnp.int8:
    return kernels.to_float(
        kernels.shift_matmul(x, packed, **kernel_options), dtype)
  if x.dtype not in kernels.FLOAT_DTYPES:
    x = x.astype(dtype)
  return kernels.shift_matmul(x, packed, **kernel_options).astype(
      dtype)


def _add_bias(module: nn.Module, y: jax.Array, dtype) -> jax.Array:
  if not module.use_bias:
    return y
  bias = module.get_variable("params", "bias").astype(dtype)
  return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def _patches_in_kernel_order(module: nn.Conv, x: jax.Array) -> jax.Array:
  """Patches of ``x`` with features ``(*kernel_size, cin)``, row-major.

  That is the row order of the packed ``(prod(kernel_size) * cin, cout)``
  view of the kernel, so the kernel never needs a transposed copy.
  """
  if module.feature_group_count != 1:
    raise ValueError("packed Conv supports feature_group_count=1 only, got "
                     f"{module.feature_group_count}.")
  patches = im2col.conv_patches(module, x)
  cin, taps = x.shape[-1], patches.shape[-1] // x.shape[-1]
  kernel_order = jnp.swapaxes(
      patches.reshape(patches.shape[:-1] + (cin, taps)), -1, -2)
  return kernel_order.reshape(patches.shape)


def _interceptor(kernel_options):
  """Routes packed Dense/Conv calls through the kernel."""

  def on_call(call):
    module = call.module
    packed = module.get_variable("params", "kernel")
    if not isinstance(packed, packing.PackedPow2):
      return None
    if not isinstance(module, (nn.Dense, nn.Conv)):
      raise ValueError(f"{layers.path_name(call.path)}: packed inference runs nn.Dense "
                       f"and nn.Conv kernels, not {call.kind}.")
    x = call.inputs
    dtype = _output_dtype(module, x)
    if isinstance(module, nn.Conv):
      x = _patches_in_kernel_order(module, x)
    y = _product(x, packed, dtype, kernel_options)
    return _add_bias(module, y, dtype)

  return layers.intercept_linear_calls(on_call)


def packed_apply(model: nn.Module, packed_variables: PyTree, *args,
                 block_m: Optional[int] = None, block_n: Optional[int] = None,
                 interpret: Optional[bool] = None, **kwargs):
  """``model.apply`` with packed Dense/Conv kernels run by the shift kernel.

  Args:
    model: a Flax linen module.
    packed_variables: from :func:`pack_variables`.
    *args: inputs to ``model.apply`` (e.g. images; int8 inputs to a packed
      first layer take the exact integer path).
    block_m: optional kernel block override, see
      :func:`inq_jax.deploy.shift_matmul`.
    block_n: optional kernel block override.
    interpret: optional interpret-mode override.
    **kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    What ``model.apply`` returns.
  """
  options = dict(block_m=block_m, block_n=block_n, interpret=interpret)
  with nn.intercept_methods(_interceptor(options)):
    return model.apply(packed_variables, *args, **kwargs)


@functools.partial(jax.jit, static_argnums=0, static_argnames="apply_kwargs")
def _jitted_packed_apply(model, packed_variables, args, apply_kwargs):
  return packed_apply(model, packed_variables, *args, **dict(apply_kwargs))


def evaluate_packed(model: nn.Module, variables: PyTree, state: INQState,
                    *args, **kwargs):
  """Packs an INQ-quantized model and runs it through the kernel (jitted).

  The jitted apply is cached on the model and the keyword arguments, so
  repeated calls with the same input shapes compile once. To pack only once
  as well, call :func:`pack_variables` once and :func:`packed_apply` under
  your own ``jax.jit``.

  Args:
    model: the Flax module (hashable, as linen modules are).
    variables: its variables after INQ with portion 1.
    state: the final :class:`inq_jax.INQState`.
    *args: inputs for ``model.apply``.
    **kwargs: keyword arguments for ``model.apply`` (static, e.g.
      ``train=False``).

  Returns:
    The model outputs.
  """
  packed = pack_variables(variables, state)
  return _jitted_packed_apply(model, packed, args,
                              tuple(sorted(kwargs.items())))
