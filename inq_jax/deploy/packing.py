"""Packed storage of INQ power-of-two weights and its real size.

A weight ``W`` whose values lie in ``P = {0, ±2^n2, ..., ±2^n1}`` is stored as
the ``bits``-bit codes of :func:`inq_jax.pow2_encode` (sign bit and exponent
field; code 0 is the value 0) plus the layer's ``n1``. The layout is the one
the shift-matmul kernel (:mod:`inq_jax.deploy.kernels`) reads:

* ``W`` is viewed as a matrix ``(K, N)``: the last axis is the output axis
  ``N`` and the leading axes are flattened row-major into ``K`` (a Flax Dense
  kernel ``(in, out)``, a Conv kernel ``(kh, kw, cin, cout)`` as
  ``(kh·kw·cin, cout)``).
* ``K`` is padded with zero codes to ``K_pad``, a multiple of ``k_tile``,
  the kernel's step along ``K``.
* ``bits <= 4``: two codes per byte. Inside each block of ``k_tile`` rows,
  byte row ``r`` holds row ``r`` in its low nibble and row ``r + k_tile/2`` in
  its high nibble, so a kernel step multiplies the first half of its
  activation tile by the low nibbles and the second half by the high ones:
  no interleaving of rows in the kernel. ``data`` is ``(K_pad / 2, N)``.
* ``bits > 4``: one code per byte, ``data`` is ``(K_pad, N)``.

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017 (Sec. 2.1 for ``P``; the
paper stores 5-bit codes and notes the shift-based inference this enables).
"""

import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from inq_jax import pow2
from inq_jax import validation
from inq_jax.incremental import INQState

PyTree = Any

# Codes of at most this many bits are stored two per byte.
NIBBLE_BITS = 4

# Granule and preferred size of ``k_tile`` per backend. TPU: each half of an
# activation tile is a lane block, a multiple of 128 (a uint8 code tile
# of k_tile/2 rows then also meets the 32-row int8 sublane tiling). GPU
# (Triton) and CPU: halves of at least 16, the smallest tl.dot operand.
_K_TILE_GRANULE = {"tpu": 256, "gpu": 32, "cpu": 32}
_K_TILE_TARGET = {"tpu": 512, "gpu": 128, "cpu": 128}


@struct.dataclass
class PackedPow2:
  """A power-of-two weight in packed code form (a pytree).

  Attributes:
    data: uint8 codes in the layout of the module docstring.
    n1: int32 scalar, the largest exponent of the layer; ``n2 = n1 + 1 -
      2^(bits-2)``.
    shape: static, the logical shape of the weight.
    bits: static, the code width, 2..8.
    k_tile: static, the padding and kernel step along ``K``.
  """
  data: jax.Array
  n1: jax.Array
  shape: Tuple[int, ...] = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  k_tile: int = struct.field(pytree_node=False)

  @property
  def k(self) -> int:
    """Rows of the matrix view (product of the leading axes)."""
    return math.prod(self.shape[:-1])

  @property
  def n(self) -> int:
    """Columns of the matrix view (the output axis)."""
    return self.shape[-1]

  @property
  def k_padded(self) -> int:
    return round_up(self.k, self.k_tile)

  @property
  def codes_per_byte(self) -> int:
    return codes_per_byte(self.bits)

  @property
  def n2(self) -> jax.Array:
    return self.n1 + 1 - pow2.num_magnitudes(self.bits)


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def codes_per_byte(bits: int) -> int:
  """2 when ``bits <= 4`` (nibbles), else 1."""
  return 2 if pow2.check_bits(bits) <= NIBBLE_BITS else 1


def default_k_tile(k: int, platform: Optional[str] = None) -> int:
  """The ``k_tile`` used when :func:`pack` is not given one.

  The backend's preferred step, shrunk to a granule multiple for small ``K``
  so that small layers are not padded much.

  Args:
    k: rows of the matrix view.
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; defaults to the default
      backend.

  Returns:
    An even positive int.
  """
  platform = platform or jax.default_backend()
  granule = _K_TILE_GRANULE.get(platform, _K_TILE_GRANULE["cpu"])
  target = _K_TILE_TARGET.get(platform, _K_TILE_TARGET["cpu"])
  return min(target, round_up(max(k, 1), granule))


def _check_k_tile(k_tile) -> int:
  if (isinstance(k_tile, (bool, np.bool_)) or
      not isinstance(k_tile, (int, np.integer)) or k_tile < 2 or k_tile % 2):
    raise ValueError(f"k_tile must be an even int >= 2, got {k_tile!r}.")
  return int(k_tile)


def pack(w, bits: int, n1, *, k_tile: Optional[int] = None) -> PackedPow2:
  """Packs a power-of-two weight into codes (eager, not traceable).

  Args:
    w: floating weight, ``ndim >= 2``, every value in ``P`` of ``(bits, n1)``
      (e.g. after INQ with portion 1).
    bits: code width, an integer in 2..8.
    n1: int scalar, the layer's largest exponent (``INQState.n1``).
    k_tile: even int, the ``K`` step of the kernel; default
      :func:`default_k_tile`.

  Returns:
    A :class:`PackedPow2`; :func:`unpack` gives ``w`` back exactly.

  Raises:
    ValueError: on bad ``bits``/``k_tile``/shape, a traced ``w``, or any value
      of ``w`` outside ``P`` (the message counts them).

  References:
    Zhou et al., ICLR 2017, Sec. 2.1.
  """
  bits = pow2.check_bits(bits)
  w = jnp.asarray(w)
  validation.check_floating(w, "w")
  if w.ndim < 2:
    raise ValueError(f"pack needs a weight with ndim >= 2, got shape "
                     f"{w.shape}.")
  if not (validation.is_concrete(w) and validation.is_concrete(n1)):
    raise ValueError("pack checks values eagerly: call it outside jax.jit.")
  n1 = jnp.asarray(n1, jnp.int32)
  if n1.shape != ():
    raise ValueError(f"n1 must be a scalar, got shape {n1.shape}.")
  outside = int(jnp.sum(~pow2.in_codebook(w, bits, n1)))
  if outside:
    raise ValueError(
        f"{outside} of {w.size} values are not in the {bits}-bit power-of-two "
        f"set for n1={int(n1)}; quantize them first (INQ to portion 1).")
  k, n = math.prod(w.shape[:-1]), w.shape[-1]
  k_tile = default_k_tile(k) if k_tile is None else _check_k_tile(k_tile)
  codes = pow2.pow2_encode(w.reshape(k, n), bits, n1)
  codes = jnp.pad(codes, ((0, round_up(k, k_tile) - k), (0, 0)))
  if codes_per_byte(bits) == 2:
    tiles = codes.reshape(-1, 2, k_tile // 2, n)
    codes = (tiles[:, 0] | (tiles[:, 1] << 4)).reshape(-1, n)
  return PackedPow2(data=codes, n1=n1, shape=tuple(w.shape), bits=bits,
                    k_tile=k_tile)


def unpack_codes(packed: PackedPow2) -> jax.Array:
  """The ``(K_pad, N)`` uint8 codes of ``packed`` (padding rows are 0)."""
  data = packed.data
  if packed.codes_per_byte == 1:
    return data
  tiles = data.reshape(-1, 1, packed.k_tile // 2, packed.n)
  halves = jnp.concatenate([tiles & 0xF, tiles >> 4], axis=1)
  return halves.reshape(-1, packed.n)


def unpack(packed: PackedPow2, dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`pack`: the weight with its logical shape.

  Args:
    packed: a :class:`PackedPow2`.
    dtype: floating dtype of the result.

  Returns:
    The values of ``P`` as an array of ``packed.shape``.
  """
  codes = unpack_codes(packed)[:packed.k]
  return pow2.pow2_decode(codes, packed.bits, packed.n1,
                          dtype=dtype).reshape(packed.shape)


def pack_params(params: PyTree, state: INQState, *,
                k_tile: Optional[int] = None) -> PyTree:
  """Packs every quantizable leaf of an INQ-quantized params pytree.

  Args:
    params: parameters after INQ with portion 1.
    state: their :class:`inq_jax.INQState` (``n1`` per layer, ``bits`` and
      the ``quantizable`` predicate).
    k_tile: optional ``K`` step for every layer (default per layer,
      :func:`default_k_tile`).

  Returns:
    ``params`` with each quantizable leaf replaced by a :class:`PackedPow2`;
    the other leaves are kept.

  Raises:
    ValueError: when the trees differ, or a quantizable leaf is not in ``P``
      (the message names the leaf).
  """
  validation.check_same_structure(
      jax.tree.map(lambda _: 0, params), jax.tree.map(lambda _: 0, state.n1),
      "params", "state.n1")

  def pack_leaf(path, leaf, n1, sel):
    if not sel:
      return leaf
    try:
      return pack(leaf, state.bits, n1, k_tile=k_tile)
    except ValueError as error:
      raise ValueError(f"{validation.path_name(path)}: {error}") from error

  return jax.tree_util.tree_map_with_path(pack_leaf, params, state.n1,
                                          state.quantizable_mask(params))


def _is_packed(leaf) -> bool:
  return isinstance(leaf, PackedPow2)


def unpack_params(packed_params: PyTree, dtype=jnp.float32) -> PyTree:
  """Inverse of :func:`pack_params`: packed leaves back to float weights."""
  return jax.tree.map(
      lambda leaf: unpack(leaf, dtype) if _is_packed(leaf) else leaf,
      packed_params, is_leaf=_is_packed)


class SizeReport(NamedTuple):
  """Storage of a packed params pytree, in bytes.

  Attributes:
    fp32_bytes: every parameter stored as float32.
    packed_bytes: what the packed pytree really holds: the code arrays
      (padding included), 4 bytes of ``n1`` per packed layer, and the other
      leaves in their own dtype.
    codebook_bytes: the information-theoretic size of the packed layers under
      a uniform code, ``sum_l size_l · log2(2^(bits-1) + 1) / 8``, plus the
      other leaves and ``n1`` as in ``packed_bytes``.
    entropy_bytes: the same with the empirical entropy of each layer's codes,
      ``sum_l size_l · H(codes_l) / 8`` (a lower bound for an entropy coder).
    quantized_fraction: share of parameters that are packed.
  """
  fp32_bytes: int
  packed_bytes: int
  codebook_bytes: float
  entropy_bytes: float
  quantized_fraction: float


def _code_entropy_bits(packed: PackedPow2) -> float:
  """Empirical entropy in bits per weight of the codes (padding excluded)."""
  codes = np.asarray(unpack_codes(packed)[:packed.k])
  counts = np.bincount(codes.reshape(-1), minlength=2**packed.bits)
  probs = counts[counts > 0] / codes.size
  return float(-(probs * np.log2(probs)).sum())


def size_report(packed_params: PyTree) -> SizeReport:
  """Bytes of a :func:`pack_params` result against FP32 and entropy bounds.

  Args:
    packed_params: a pytree with :class:`PackedPow2` leaves.

  Returns:
    A :class:`SizeReport`.
  """
  leaves = jax.tree.leaves(packed_params, is_leaf=_is_packed)
  fp32 = packed = 0
  codebook = entropy = 0.0
  quantized = total = 0
  for leaf in leaves:
    if _is_packed(leaf):
      size = math.prod(leaf.shape)
      quantized += size
      n1_bytes = leaf.n1.dtype.itemsize
      packed += leaf.data.nbytes + n1_bytes
      codebook += size * math.log2(2**(leaf.bits - 1) + 1) / 8 + n1_bytes
      entropy += size * _code_entropy_bits(leaf) / 8 + n1_bytes
    else:
      size = int(np.size(leaf))
      own = size * jnp.asarray(leaf).dtype.itemsize
      packed += own
      codebook += own
      entropy += own
    total += size
    fp32 += 4 * size
  return SizeReport(fp32_bytes=fp32, packed_bytes=packed,
                    codebook_bytes=codebook, entropy_bytes=entropy,
                    quantized_fraction=quantized / total if total else 0.0)
