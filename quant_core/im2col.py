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
import math
import string
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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
      :class:`quant_core.layers.Convolution` (only its hyper-parameters are
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


class _Geometry(NamedTuple):
  """A conv's window on an input: per spatial axis, after padding is resolved."""
  kernel_size: tuple
  strides: tuple
  input_dilation: tuple
  kernel_dilation: tuple
  pads: tuple  # ((lo, hi), ...)
  out: tuple  # output positions

  @property
  def tap_offsets(self) -> list:
    """Offset of each tap (row-major over the window) in the padded input."""
    return [tuple(t * d for t, d in zip(tap, self.kernel_dilation, strict=True))
            for tap in itertools.product(*(range(k) for k in self.kernel_size))]


def _geometry(module, spatial) -> _Geometry:
  kernel_size = tuple(module.kernel_size)
  rank = len(kernel_size)
  padding = nn.linear.canonicalize_padding(module.padding, rank)
  strides = _per_axis(module.strides, rank)
  input_dilation = _per_axis(module.input_dilation, rank)
  kernel_dilation = _per_axis(module.kernel_dilation, rank)
  dilated = [(n - 1) * d + 1 for n, d in zip(spatial, input_dilation, strict=True)]
  window = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(dilated, window, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  out = tuple((n + lo + hi - w) // s + 1
              for n, (lo, hi), w, s in zip(dilated, pads, window, strides, strict=True))
  return _Geometry(kernel_size, strides, input_dilation, kernel_dilation, pads, out)


def conv_taps(module, x: jax.Array) -> list:
  """The input seen by each kernel tap: ``x`` shifted, strided and padded.

  Tap ``t`` (row-major over the kernel window) of :func:`conv_patches`, as
  an array ``(n, *out_spatial, cin)``: ``patches[..., c * T + t] ==
  conv_taps(...)[t][..., c]``.

  Args:
    module: as in :func:`conv_patches` (padding already checked there).
    x: ``(n, *spatial, cin)``.
  """
  geometry = _geometry(module, x.shape[1:-1])
  spatial_config = [(lo, hi, d - 1) for (lo, hi), d in
                    zip(geometry.pads, geometry.input_dilation, strict=True)]
  config = [(0, 0, 0)] + spatial_config + [(0, 0, 0)]
  padded = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  taps = []
  for begin in geometry.tap_offsets:
    end = [b + (o - 1) * s + 1
           for b, o, s in zip(begin, geometry.out, geometry.strides, strict=True)]
    taps.append(jax.lax.slice(padded, [0, *begin, 0],
                              [padded.shape[0], *end, padded.shape[-1]],
                              [1, *geometry.strides, 1]))
  return taps


def patch_gram(module, x: jax.Array, groups: int, row_weight=None) -> jax.Array:
  """``(groups, F/g, F/g)`` float32 Gram of each group's patch rows of ``x``.

  ``P^T diag(row_weight) P`` for the patches ``P`` of :func:`conv_patches`
  (rows: the batch and output positions), in the feature order of the
  module docstring, computed the cheapest of three exact ways:

  * one input channel per group (depthwise) and at most
    ``_MAX_TAP_PAIRS_TAPS`` taps: entry ``(c, s, t)`` is a fused reduction
    of taps ``s`` and ``t`` of channel ``c``, without patches;
  * stride 1 and no row weights, where it is estimated to be cheaper: from
    the input's products at the distinct tap offsets
    (:func:`_shifted_patch_gram`; a 3x3 conv takes 13 offsets instead of
    81 pairs of taps, plus thin edge terms);
  * otherwise the patches' own product.

  The three agree to float32 rounding (the order of the sums differs).

  Memory stays bounded whatever ``n``: the examples are taken a few at a
  time (a ``lax.scan``), so that the patches (or shifted inputs) of one
  step stay under ``_GRAM_STEP_BYTES``; one example is the smallest step.

  Args:
    module: as in :func:`conv_patches`.
    x: ``(n, *spatial, cin)``.
    groups: the conv's ``feature_group_count``.
    row_weight: optional ``(rows,)`` weight of each patch row.
  """
  x = x.astype(jnp.float32)
  geometry = _geometry(module, x.shape[1:-1])
  n_batch, cin = x.shape[0], x.shape[-1]
  taps = len(geometry.tap_offsets)
  step_bytes = 4 * cin * math.prod(geometry.out) * taps
  if _is_shift_candidate(geometry):
    deltas = len(_half_offsets(geometry.tap_offsets)[0])
    step_bytes = max(step_bytes, 4 * cin * math.prod(x.shape[1:-1]) * deltas)
  # The largest divisor of n within the budget: the steps are views of x, not copies.
  step = max(d for d in range(1, n_batch + 1)
             if n_batch % d == 0 and (d == 1 or d * step_bytes <= _GRAM_STEP_BYTES))
  if step == n_batch:
    return _whole_patch_gram(module, geometry, x, groups, row_weight)

  def add_step(total, part):
    xs, ws = part
    ws = None if ws is None else ws.reshape(-1)
    return total + _whole_patch_gram(module, geometry, xs, groups, ws), None

  split = lambda a: a.reshape((n_batch // step, step) + a.shape[1:])
  parts = (split(x), None if row_weight is None else split(row_weight.reshape(n_batch, -1)))
  size = cin // groups * taps
  total, _ = jax.lax.scan(add_step, jnp.zeros((groups, size, size), jnp.float32), parts)
  return total


# Bytes of patches (or shifted inputs) that one step of a patch Gram makes, at most.
_GRAM_STEP_BYTES = 32 * 2**20


def _whole_patch_gram(module, geometry, x, groups, row_weight):
  """:func:`patch_gram` of all of ``x`` at once."""
  taps_count = math.prod(geometry.kernel_size)
  if x.shape[-1] == groups and taps_count <= _MAX_TAP_PAIRS_TAPS:
    return _tap_pairs_gram(module, x, row_weight)
  if row_weight is None and _shift_pays(geometry, x.shape, groups):
    return _shifted_patch_gram(geometry, x, groups)
  rows = conv_patches(module, x).reshape(-1, groups, x.shape[-1] // groups * taps_count)
  weighted = rows if row_weight is None else rows * row_weight[:, None, None]
  return jnp.einsum("rgf,rgh->gfh", weighted, rows, precision=_HIGHEST)


_HIGHEST = jax.lax.Precision.HIGHEST

# Depthwise Grams from pairs of taps up to this window size (3x3: 45 reductions).
_MAX_TAP_PAIRS_TAPS = 9


def _tap_pairs_gram(module, x, row_weight):
  taps = conv_taps(module, x)
  weighted = taps if row_weight is None else [
      t * row_weight.reshape(t.shape[:-1] + (1,)) for t in taps]
  axes = tuple(range(taps[0].ndim - 1))
  pairs = {}
  for s, a in enumerate(weighted):
    for t in range(s, len(taps)):
      pairs[s, t] = jnp.sum(a * taps[t], axis=axes)
  n = len(taps)
  gram = jnp.stack([jnp.stack([pairs[min(s, t), max(s, t)] for t in range(n)])
                    for s in range(n)])
  return jnp.transpose(gram, (2, 0, 1))


def _edge_values(geometry, spatial):
  """Per axis: for each tap, the interval ``[a, b)`` of input positions its
  patch rows read; and the sorted positions that some tap leaves out."""
  intervals, edges = [], []
  for k, n in enumerate(spatial):
    lo, o = geometry.pads[k][0], geometry.out[k]
    per_tap = [(max(0, u[k] - lo), min(n, u[k] - lo + o)) for u in geometry.tap_offsets]
    intervals.append(per_tap)
    edges.append(sorted({z for a, b in per_tap for z in range(n) if z < a or z >= b}))
  return intervals, edges


def _shift_pays(geometry, x_shape, groups: int) -> bool:
  """Whether :func:`_shifted_patch_gram` applies (stride 1, no input
  dilation, no cropping) and is estimated to be cheaper than the patches.

  Estimated costs in multiply-adds, with an element copied or transposed
  counting as ``_MOVE_COST`` (calibrated on 2 CPU cores: both methods are
  bound by their copies as much as by their matmuls). Patches: ``N R (T
  c)^2`` plus writing ``N R T cin`` patch entries (``N`` examples, ``R``
  output positions, ``T`` taps, ``c`` channels per group). Shifted: ``|D|
  c^2`` per input position covered by the whole-input and edge products
  (``|D|`` distinct tap offsets), writing the ``|D|`` shifted inputs, and
  combining and arranging the blocks (independent of ``N``).
  """
  if not _is_shift_candidate(geometry):
    return False
  taps = len(geometry.tap_offsets)
  n_batch, *spatial, cin = x_shape
  c = cin // groups
  _, edges = _edge_values(geometry, spatial)
  deltas = len(_half_offsets(geometry.tap_offsets)[0])
  covered, terms = 0, 0
  for subset in _subsets(len(spatial)):
    covered += math.prod(len(edges[k]) if k in subset else n
                         for k, n in enumerate(spatial))
    terms += math.prod(len(edges[k]) for k in subset)
  pairs = taps * (taps + 1) // 2
  shifted = (n_batch * deltas * c * cin * covered
             + pairs * terms * deltas * c * cin
             + _MOVE_COST * (n_batch * deltas * cin * math.prod(spatial)
                             + 4 * taps ** 2 * c * cin))
  rows = n_batch * math.prod(geometry.out)
  patches = rows * taps ** 2 * c * cin + _MOVE_COST * rows * taps * cin
  return 5 * shifted < 4 * patches


def _is_shift_candidate(geometry) -> bool:
  """Stride 1, no input dilation, no cropping, several taps."""
  return (all(s == 1 for s in geometry.strides)
          and all(d == 1 for d in geometry.input_dilation)
          and all(lo >= 0 and hi >= 0 for lo, hi in geometry.pads)
          and min(geometry.out) >= 1 and len(geometry.tap_offsets) >= 2)


# Multiply-adds that copying or transposing one element costs, in time.
_MOVE_COST = 128


def _subsets(rank):
  return itertools.chain.from_iterable(
      itertools.combinations(range(rank), size) for size in range(rank + 1))


def _half_offsets(offsets):
  """The tap pairs ``s <= t`` and the distinct offsets ``u_t - u_s`` they take."""
  pairs = [(s, t) for s in range(len(offsets)) for t in range(s, len(offsets))]
  deltas = sorted({_offset(offsets[s], offsets[t]) for s, t in pairs})
  return deltas, pairs


def _offset(u, v):
  return tuple(b - a for a, b in zip(u, v, strict=True))


def _on_edges(a, axis, positions):
  """``a`` restricted to ``positions`` along ``axis``: one slice per run."""
  runs, start = [], positions[0]
  for prev, z in zip(positions, positions[1:] + [None], strict=True):
    if z != prev + 1:
      runs.append(jax.lax.slice_in_dim(a, start, prev + 1, axis=axis))
      start = z
  return jnp.concatenate(runs, axis=axis) if len(runs) > 1 else runs[0]


def _shifted_patch_gram(geometry, x, groups):
  r"""The patch Gram of a stride-1 conv from shifted products of its input.

  With ``u_s`` the offset of tap ``s`` and ``z`` unpadded input positions,
  block ``(s, t)`` of the Gram is

  .. math:: G_{st} = \sum_{z \in B_s} x_z^\top x_{z + u_t - u_s}

  where ``B_s`` is the box of positions tap ``s`` reads (``x`` is zero
  outside the input), and ``G_{ts} = G_{st}^\top``. Only ``δ = u_t - u_s``
  enters the product, so for each distinct ``δ`` of the pairs ``s <= t``
  one product over the whole input is taken, plus products over the few
  edge positions that some tap leaves out; each block is its whole-input
  product minus its own excluded edges, by inclusion-exclusion over the
  axes (one small matmul per subset of axes).
  """
  n_batch, *spatial, cin = x.shape
  rank = len(spatial)
  c = cin // groups
  offsets = geometry.tap_offsets
  taps = len(offsets)
  deltas, pairs = _half_offsets(offsets)
  margin = [max(abs(d[k]) for d in deltas) for k in range(rank)]
  padded = jnp.pad(x, [(0, 0)] + [(m, m) for m in margin] + [(0, 0)])
  # (n, *spatial, deltas, groups, c): the input seen at each offset.
  shifted = jnp.stack([jax.lax.slice(
      padded, [0, *(m + d for m, d in zip(margin, delta, strict=True)), 0],
      [n_batch, *(m + d + n for m, d, n in zip(margin, delta, spatial, strict=True)),
       cin]) for delta in deltas], axis=-2).reshape((n_batch, *spatial, len(deltas),
                                                     groups, c))
  base = x.reshape((n_batch, *spatial, groups, c))
  intervals, edges = _edge_values(geometry, spatial)
  onehot = np.zeros((len(pairs), len(deltas)), np.float32)
  for p, (s, t) in enumerate(pairs):
    onehot[p, deltas.index(_offset(offsets[s], offsets[t]))] = 1.0
  products, coefficients = [], []
  for subset in _subsets(rank):
    if any(not edges[k] for k in subset):
      continue
    xs, ys = base, shifted
    for k in subset:
      xs, ys = _on_edges(xs, 1 + k, edges[k]), _on_edges(ys, 1 + k, edges[k])
    # Edge positions first, then the positions summed over: canonical matmuls.
    front = [1 + k for k in subset]
    rest = [0] + [1 + k for k in range(rank) if k not in subset]
    xs = jnp.transpose(xs, front + rest + [rank + 1, rank + 2])
    ys = jnp.transpose(ys, front + rest + [rank + 1, rank + 2, rank + 3])
    edge_count = math.prod(xs.shape[:len(subset)])
    xs = xs.reshape(edge_count, -1, groups, c)
    ys = ys.reshape(edge_count, -1, len(deltas), groups, c)
    products.append(jnp.einsum("EPDGH,EPGC->EDGHC", ys, xs, precision=_HIGHEST
                               ).reshape((-1, groups, c, c)))
    # Pair (s, t) takes its offset with sign (-1)^|subset| on the edge
    # positions tap s leaves out, along every axis of the subset.
    excluded = [np.asarray([[not a <= z < b for z in edges[k]]
                            for a, b in (intervals[k][s] for s, _ in pairs)], np.float32)
                for k in subset]
    letters = string.ascii_uppercase[:len(subset)]
    coefficients.append((-1.0) ** len(subset) * np.einsum(
        ",".join(["PZ"] + [f"P{e}" for e in letters]) + f"->P{letters}Z", onehot,
        *excluded).reshape(len(pairs), -1))
  blocks = jnp.einsum("PK,KGHC->PGHC", jnp.asarray(np.concatenate(coefficients, axis=1)),
                      jnp.concatenate(products), precision=_HIGHEST)
  # blocks[p, g, h, c] is G_st[c, h] for pair p = (s, t), s <= t; G_ts is
  # its transpose. Arrange as [g, (c, s), (h, t)]: channel-major features.
  both = jnp.concatenate([blocks, jnp.swapaxes(blocks, -1, -2)])
  index = np.zeros((taps, taps), np.int32)
  for p, (s, t) in enumerate(pairs):
    index[s, t], index[t, s] = p, len(pairs) + p
  full = both[index.reshape(-1)].reshape(taps, taps, groups, c, c)
  return jnp.transpose(full, (2, 4, 0, 3, 1)).reshape(groups, c * taps, c * taps)


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
