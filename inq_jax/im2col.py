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

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _per_axis(value, rank):
  if value is None:
    return (1,) * rank
  return (value,) * rank if isinstance(value, int) else tuple(value)


def conv_patches(module, x: jax.Array) -> jax.Array:
  """Patches of ``x`` for ``module``: ``x`` convolved by ``module`` is a matmul.

  Strides, SAME/VALID/explicit padding, input and kernel dilation follow
  ``nn.Conv``. The patches are strided slices of the padded input, one per
  kernel tap: pure data movement, exact for every dtype and free of the
  arithmetic of a patch-extracting convolution.

  Args:
    module: an ``nn.Conv``, an ``nnx.Conv`` or an
      :class:`inq_jax.layers.Convolution` (only its hyper-parameters are
      read: ``kernel_size``, ``strides``, ``padding``, ``input_dilation``,
      ``kernel_dilation``, ``mask``).
    x: ``(*batch, *spatial, cin)`` with one spatial axis per kernel axis.

  Returns:
    ``(*batch, *out_spatial, cin * prod(kernel_size))`` in ``x``'s dtype,
    features ordered as in the module docstring.

  Raises:
    ValueError: for masked convs, circular or causal padding, or an input
      with too few axes.
  """
  kernel_size = tuple(module.kernel_size)
  rank = len(kernel_size)
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
  # (n, *out, cin, taps): feature c * prod(kernel_size) + t.
  patches = jnp.stack(conv_taps(module, flat), axis=-1)
  return patches.reshape(batch_shape + patches.shape[1:-2] + (-1,))


def conv_taps(module, x: jax.Array) -> list:
  """The input seen by each kernel tap: ``x`` shifted, strided and padded.

  Tap ``t`` (row-major over the kernel window) of :func:`conv_patches`, as
  an array ``(n, *out_spatial, cin)``: ``patches[..., c * T + t] ==
  conv_taps(...)[t][..., c]``.

  Args:
    module: as in :func:`conv_patches` (padding already checked there).
    x: ``(n, *spatial, cin)``.
  """
  kernel_size = tuple(module.kernel_size)
  rank = len(kernel_size)
  padding = nn.linear.canonicalize_padding(module.padding, rank)
  strides = _per_axis(module.strides, rank)
  input_dilation = _per_axis(module.input_dilation, rank)
  kernel_dilation = _per_axis(module.kernel_dilation, rank)
  spatial = x.shape[1:-1]
  dilated = [(n - 1) * d + 1 for n, d in zip(spatial, input_dilation, strict=True)]
  window = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(dilated, window, strides, padding)
  spatial_config = [(lo, hi, d - 1)
                    for (lo, hi), d in zip(padding, input_dilation, strict=True)]
  config = [(0, 0, 0)] + spatial_config + [(0, 0, 0)]
  padded = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  out = [(n + lo + hi - w) // s + 1
         for n, (lo, hi), w, s in zip(dilated, padding, window, strides, strict=True)]
  taps = []
  for tap in itertools.product(*(range(k) for k in kernel_size)):
    begin = [t * d for t, d in zip(tap, kernel_dilation, strict=True)]
    end = [b + (o - 1) * s + 1 for b, o, s in zip(begin, out, strides, strict=True)]
    taps.append(jax.lax.slice(padded, [0] + begin + [0],
                              [padded.shape[0]] + end + [padded.shape[-1]],
                              [1] + list(strides) + [1]))
  return taps


def conv_kernel_matrix(kernel: jax.Array, groups: int) -> jax.Array:
  """Kernel ``(*k, cin/g, cout)`` as ``(g, cin/g * prod(k), cout/g)``.

  Rows follow the patch feature order of :func:`conv_patches`, so group
  ``j``'s output is ``patches[..., j * F/g:(j + 1) * F/g] @ matrix[j]``.
  """
  rank = kernel.ndim - 2
  channel_first = (rank,) + tuple(range(rank)) + (rank + 1,)
  matrix = kernel.transpose(channel_first).reshape(-1, kernel.shape[-1])
  matrix = matrix.reshape(matrix.shape[0], groups, -1)
  return matrix.transpose((1, 0, 2))


def kernel_from_matrix(matrix: jax.Array, kernel_shape) -> jax.Array:
  """Inverse of :func:`conv_kernel_matrix` for a kernel of ``kernel_shape``."""
  rank = len(kernel_shape) - 2
  flat = matrix.transpose((1, 0, 2)).reshape(matrix.shape[1], -1)
  channel_first = flat.reshape((kernel_shape[rank],) + tuple(kernel_shape[:rank])
                               + (kernel_shape[-1],))
  return channel_first.transpose(tuple(range(1, rank + 1)) + (0, rank + 1))
