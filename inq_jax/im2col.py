"""Convolutions as matrix products: the patches of an ``nn.Conv`` input.

One im2col for the whole project: COMQ solves conv layers as least squares
over these patches, and packed inference multiplies them by packed kernels.

``lax.conv_general_dilated_patches`` orders the patch features channel
first: feature ``c * prod(kernel_size) + t`` is input channel ``c`` at
kernel tap ``t`` (taps row-major over the kernel window). With
``feature_group_count = g`` the features of group ``j`` are the contiguous
block ``j * F/g : (j + 1) * F/g``, matching
``conv_kernel_matrix(kernel, g)[j]``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _per_axis(value, rank):
  if value is None:
    return (1,) * rank
  return (value,) * rank if isinstance(value, int) else tuple(value)


def conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
  """Patches of ``x`` for ``module``: ``x`` convolved by ``module`` is a matmul.

  Strides, SAME/VALID/explicit padding, input and kernel dilation and
  feature groups follow ``nn.Conv``. Integer inputs are exact: the patch
  extraction runs in ``float32`` (a 0/1 filter at HIGHEST precision) and the
  result is cast back.

  Args:
    module: a bound or unbound ``nn.Conv`` (only its hyper-parameters are
      read).
    x: ``(*batch, *spatial, cin)`` with one spatial axis per kernel axis.

  Returns:
    ``(*batch, *out_spatial, cin * prod(kernel_size))`` in ``x``'s dtype,
    features ordered as in the module docstring.

  Raises:
    ValueError: for masked convs, circular or causal padding, or an input
      with too few axes.
  """
  rank = len(module.kernel_size)
  if module.mask is not None:
    raise ValueError("conv_patches: masked convs are not supported.")
  padding = nn.linear.canonicalize_padding(module.padding, rank)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ValueError(f"conv_patches supports SAME, VALID or explicit padding, "
                     f"got {padding!r}.")
  if x.ndim < rank + 2:
    raise ValueError(f"conv_patches needs inputs (*batch, *spatial, features) "
                     f"with {rank} spatial axes, got shape {x.shape}.")
  batch_shape = x.shape[:-(rank + 1)]
  flat = x.reshape((-1,) + x.shape[-(rank + 1):])
  spatial = "HWDXYZ"[:rank]
  numbers = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  # A 0/1 filter at HIGHEST precision copies f32 values exactly.
  patches = jax.lax.conv_general_dilated_patches(
      flat if jnp.issubdtype(flat.dtype, jnp.floating)
      else flat.astype(jnp.float32),
      filter_shape=tuple(module.kernel_size),
      window_strides=_per_axis(module.strides, rank), padding=padding,
      lhs_dilation=_per_axis(module.input_dilation, rank),
      rhs_dilation=_per_axis(module.kernel_dilation, rank),
      dimension_numbers=numbers, precision=jax.lax.Precision.HIGHEST)
  return patches.reshape(batch_shape + patches.shape[1:]).astype(x.dtype)


def conv_kernel_matrix(kernel: jax.Array, groups: int) -> jax.Array:
  """Kernel ``(*k, cin/g, cout)`` as ``(g, cin/g * prod(k), cout/g)``.

  Rows follow the patch feature order of :func:`conv_patches`, so group
  ``j``'s output is ``patches[..., j * F/g:(j + 1) * F/g] @ matrix[j]``.
  """
  rank = kernel.ndim - 2
  channel_first = (rank,) + tuple(range(rank)) + (rank + 1,)
  matrix = jnp.transpose(kernel, channel_first).reshape(-1, kernel.shape[-1])
  matrix = matrix.reshape(matrix.shape[0], groups, -1)
  return jnp.transpose(matrix, (1, 0, 2))


def kernel_from_matrix(matrix: jax.Array, kernel_shape) -> jax.Array:
  """Inverse of :func:`conv_kernel_matrix` for a kernel of ``kernel_shape``."""
  rank = len(kernel_shape) - 2
  flat = jnp.transpose(matrix, (1, 0, 2)).reshape(matrix.shape[1], -1)
  channel_first = flat.reshape((kernel_shape[rank],) + tuple(kernel_shape[:rank])
                               + (kernel_shape[-1],))
  return jnp.transpose(channel_first, tuple(range(1, rank + 1)) + (0, rank + 1))
