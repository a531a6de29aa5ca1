"""Packed storage of quantized weights (power-of-two and uniform) and its real size.

A quantized weight is stored as ``bits``-bit unsigned integer codes plus its
grid parameters. Two grid kinds:

* :class:`PackedPow2`: values ``P = {0, ±2^n2, ..., ±2^n1}`` (INQ, COMQ's
  ``pow2`` grid) as the codes of :func:`inq_jax.pow2_encode` (sign bit and
  exponent field; code 0 is the value 0). ``n1`` is one int per layer (INQ),
  per output channel, or per output channel and group of input rows.
* :class:`PackedUniform`: ``w = scale · (code - zero_point)`` with ``code`` in
  ``[0, 2^bits)`` (asymmetric: a zero point per scale entry) or in
  ``[0, 2^bits - 1)`` with the fixed zero point ``2^(bits-1) - 1``
  (symmetric: ``2^bits - 1`` levels around 0, no zero point stored). The
  scale (and zero point) is per output channel or per output channel and
  group of ``group_size`` consecutive input rows.

Both use the layout the kernels of :mod:`quant_core.deploy.kernels` read:

* ``W`` is viewed as a matrix ``(K, N)``: the last axis is the output axis
  ``N`` and the leading axes are flattened row-major into ``K`` (a Flax Dense
  kernel ``(in, out)``, a Conv kernel ``(kh, kw, cin, cout)`` as
  ``(kh·kw·cin, cout)``).
* ``K`` is padded with zero codes to ``K_pad``, a multiple of ``k_tile``,
  the kernels' step along ``K``.
* ``bits <= 4``: two codes per byte. Inside each block of ``k_tile`` rows,
  byte row ``r`` holds row ``r`` in its low nibble and row ``r + k_tile/2`` in
  its high nibble, so a kernel step multiplies the first half of its
  activation tile by the low nibbles and the second half by the high ones:
  no interleaving of rows in the kernel. ``data`` is ``(K_pad / 2, N)``.
* ``bits > 4``: one code per byte, ``data`` is ``(K_pad, N)``.
* Group-wise parameters: group ``g`` holds input rows ``g·group_size`` to
  ``(g+1)·group_size - 1`` (the last group may be shorter); parameters are
  ``(groups, N)`` with ``groups = ceil(K / group_size)``. ``k_tile`` is a
  multiple of ``group_size`` so that a kernel step holds whole groups, and
  with nibbles ``k_tile / group_size`` is 1 or even so that each half-tile
  holds whole groups (or both halves one group).

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017 (Sec. 2.1 for ``P``; the
paper stores 5-bit codes and notes the shift-based inference this enables).
"""

import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from quant_core import pow2
from quant_core import validation

PyTree = Any

# Codes of at most this many bits are stored two per byte.
NIBBLE_BITS = 4

# Largest |code - zero_point| of a uniform grid: every such integer is exact
# in bfloat16 (8 significant bits), so the kernels decode weights exactly.
MAX_LEVEL_MAGNITUDE = 256

# Granule and preferred size of ``k_tile`` per backend. TPU: each half of an
# activation tile is a lane block, a multiple of 128 (a uint8 code tile
# of k_tile/2 rows then also meets the 32-row int8 sublane tiling). GPU
# (Triton) and CPU: halves of at least 16, the smallest tl.dot operand.
_K_TILE_GRANULE = {"tpu": 256, "gpu": 32, "cpu": 32}
_K_TILE_TARGET = {"tpu": 512, "gpu": 128, "cpu": 128}

# Indices of off-grid values quoted in an error message.
_QUOTED_INDICES = 5


class _MatrixView:
  """Shape arithmetic of a packed weight (``shape``, ``bits``, ``k_tile``,
  ``group_size`` come from the dataclass using it)."""

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
  def num_groups(self) -> int:
    """Rows of the grid parameters: ``ceil(K / group_size)``, 1 without
    groups."""
    return 1 if self.group_size is None else -(-self.k // self.group_size)


@struct.dataclass
class PackedPow2(_MatrixView):
  """A power-of-two weight in packed code form (a pytree).

  Attributes:
    data: uint8 codes in the layout of the module docstring.
    n1: int32 largest exponent: ``()`` per layer, ``(N,)`` per output
      channel, or ``(groups, N)`` per channel and group of ``group_size``
      input rows; ``n2 = n1 + 1 - 2^(bits-2)``.
    shape: static, the logical shape of the weight.
    bits: static, the code width, 2..8.
    k_tile: static, the padding and kernel step along ``K``.
    group_size: static, input rows per exponent with ``(groups, N)`` ``n1``,
      else None.
  """
  data: jax.Array
  n1: jax.Array
  shape: Tuple[int, ...] = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  k_tile: int = struct.field(pytree_node=False)
  group_size: Optional[int] = struct.field(pytree_node=False, default=None)

  @property
  def n2(self) -> jax.Array:
    return self.n1 + 1 - pow2.num_magnitudes(self.bits)

  @property
  def num_levels(self) -> int:
    """``2^(bits-1) + 1`` values: 0 and ``2^(bits-2)`` signed magnitudes."""
    return 2**(self.bits - 1) + 1


@struct.dataclass
class PackedUniform(_MatrixView):
  """A uniform-grid weight ``scale · (code - zero_point)`` in packed form.

  Attributes:
    data: uint8 codes in the layout of the module docstring.
    scale: float32 value of one code step, ``(N,)`` per output channel or
      ``(groups, N)`` per channel and group of ``group_size`` input rows.
    zero_point: int32 code of 0, shape of ``scale`` (asymmetric grid), or
      None for the symmetric grid, whose zero point is ``2^(bits-1) - 1``.
    shape: static, the logical shape of the weight.
    bits: static, the code width, 2..8.
    k_tile: static, the padding and kernel step along ``K``.
    group_size: static, input rows per scale with ``(groups, N)`` scales,
      else None.
  """
  data: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array]
  shape: Tuple[int, ...] = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  k_tile: int = struct.field(pytree_node=False)
  group_size: Optional[int] = struct.field(pytree_node=False, default=None)

  @property
  def symmetric(self) -> bool:
    return self.zero_point is None

  @property
  def num_levels(self) -> int:
    """``2^bits`` (asymmetric) or ``2^bits - 1`` (symmetric) codes."""
    return 2**self.bits - 1 if self.symmetric else 2**self.bits

  @property
  def symmetric_zero_point(self) -> int:
    """The fixed zero point of the symmetric grid, ``2^(bits-1) - 1``."""
    return 2**(self.bits - 1) - 1


PACKED_TYPES = (PackedPow2, PackedUniform)


def is_packed(leaf) -> bool:
  """True for a :class:`PackedPow2` or :class:`PackedUniform`."""
  return isinstance(leaf, PACKED_TYPES)


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def codes_per_byte(bits: int) -> int:
  """2 when ``bits <= 4`` (nibbles), else 1."""
  return 2 if pow2.check_bits(bits) <= NIBBLE_BITS else 1


def default_k_tile(k: int, platform: Optional[str] = None,
                   group_size: Optional[int] = None) -> int:
  """The ``k_tile`` used when a packing function is not given one.

  Among the powers of two from the backend's granule to its preferred step
  (Triton blocks are powers of two), the one that pads ``K`` least, the
  largest on a tie: a 288-row conv kernel takes steps of 32 on GPU and CPU,
  with no padding, where the preferred 128 would pad it to 384. With groups
  it is rounded up to ``group_size`` (when that is even and at least the
  step) or to a multiple of ``2 · group_size``, which meets the nibble rule
  of the module docstring.

  Args:
    k: rows of the matrix view.
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; defaults to the default
      backend.
    group_size: input rows per scale, or None.

  Returns:
    An even positive int.
  """
  platform = platform or jax.default_backend()
  granule = _K_TILE_GRANULE.get(platform, _K_TILE_GRANULE["cpu"])
  target = _K_TILE_TARGET.get(platform, _K_TILE_TARGET["cpu"])
  candidates = [granule * 2**i for i in range(int(math.log2(target // granule)) + 1)
                if granule * 2**i <= max(granule, round_up(max(k, 1), granule))]
  k_tile = min(candidates, key=lambda tile: (round_up(max(k, 1), tile), -tile))
  if group_size is None:
    return k_tile
  if group_size >= k_tile and group_size % 2 == 0:
    return group_size
  return round_up(k_tile, 2 * group_size)


def _is_int(value) -> bool:
  return (isinstance(value, (int, np.integer)) and
          not isinstance(value, (bool, np.bool_)))


def _check_group_size(group_size) -> Optional[int]:
  if group_size is None:
    return None
  if not _is_int(group_size) or group_size < 1:
    raise ValueError("group_size must be None (one scale per output channel) "
                     f"or an int >= 1, got {group_size!r}.")
  return int(group_size)


def _resolve_k_tile(k_tile, k: int, bits: int, group_size) -> int:
  """``k_tile`` (default :func:`default_k_tile`), checked against the layout
  rules of the module docstring."""
  if k_tile is None:
    return default_k_tile(k, group_size=group_size)
  if not _is_int(k_tile) or k_tile < 2 or k_tile % 2:
    raise ValueError(f"k_tile must be an even int >= 2, got {k_tile!r}.")
  if group_size is not None:
    groups_per_tile, rest = divmod(k_tile, group_size)
    if rest:
      raise ValueError(f"k_tile={k_tile} must be a multiple of group_size="
                       f"{group_size}: a kernel step holds whole groups.")
    if codes_per_byte(bits) == 2 and groups_per_tile > 1 and groups_per_tile % 2:
      raise ValueError(
          f"with {bits}-bit nibble codes k_tile / group_size must be 1 or "
          f"even (each half-tile holds whole groups), got {groups_per_tile}.")
  return int(k_tile)


def _matrix(array, name: str) -> jax.Array:
  """``array`` as its ``(K, N)`` view, refusing traced or 1-D input."""
  array = jnp.asarray(array)
  if array.ndim < 2:
    raise ValueError(f"{name} must have ndim >= 2 (matrix view (K, N)), got "
                     f"shape {array.shape}.")
  if not validation.is_concrete(array):
    raise ValueError("packing checks values eagerly: call it outside jax.jit.")
  return array.reshape(math.prod(array.shape[:-1]), array.shape[-1])


def _check_parameter(param, name: str, k: int, n: int, group_size, *,
                     per_layer: bool = False) -> jax.Array:
  """``param`` with its shape checked: ``(N,)``, ``(groups, N)`` with
  groups, or ``()`` where ``per_layer``."""
  param = jnp.asarray(param)
  if not validation.is_concrete(param):
    raise ValueError("packing checks values eagerly: call it outside jax.jit.")
  if group_size is None:
    allowed = [(n,)] + ([()] if per_layer else [])
  else:
    allowed = [(-(-k // group_size), n)]
  if param.shape not in allowed:
    groups = ("" if group_size is None else
              f" and group_size={group_size} (ceil(K / group_size) groups)")
    raise ValueError(
        f"{name} must have shape {' or '.join(map(str, allowed))} for a "
        f"(K, N) = ({k}, {n}) weight{groups}, got {param.shape}.")
  return param


def _per_row(param: jax.Array, k: int, n: int, group_size) -> jax.Array:
  """A ``()``, ``(N,)`` or ``(groups, N)`` parameter expanded to ``(K, N)``."""
  if group_size is not None:
    return jnp.repeat(param, group_size, axis=0)[:k]
  return jnp.broadcast_to(param.reshape((1,) * (2 - param.ndim) + param.shape),
                          (k, n))


def _raise_off_grid(bad, description: str) -> None:
  """Raises ValueError counting the ``True`` entries of the ``(K, N)`` mask
  ``bad`` and quoting the first few ``(row, col)``."""
  bad = np.asarray(bad)
  count = int(bad.sum())
  if not count:
    return
  where = [tuple(int(i) for i in index)
           for index in np.argwhere(bad)[:_QUOTED_INDICES]]
  more = (f" and {count - _QUOTED_INDICES} more" if count > _QUOTED_INDICES
          else "")
  raise ValueError(
      f"{count} of {bad.size} values are not in {description}; first (row, "
      f"col) of the (K, N) view: {', '.join(map(str, where))}{more}.")


def _layout(codes: jax.Array, bits: int, k_tile: int) -> jax.Array:
  """``(K, N)`` codes in ``[0, 2^bits)`` as the uint8 ``data`` layout."""
  k, n = codes.shape
  codes = jnp.pad(codes.astype(jnp.uint8), ((0, round_up(k, k_tile) - k),
                                            (0, 0)))
  if codes_per_byte(bits) == 1:
    return codes
  tiles = codes.reshape(-1, 2, k_tile // 2, n)
  return (tiles[:, 0] | (tiles[:, 1] << 4)).reshape(-1, n)


def unpack_codes(packed) -> jax.Array:
  """The ``(K_pad, N)`` uint8 codes of a packed weight (padding rows are 0)."""
  data = packed.data
  if packed.codes_per_byte == 1:
    return data
  tiles = data.reshape(-1, 1, packed.k_tile // 2, packed.n)
  halves = jnp.concatenate([tiles & 0xF, tiles >> 4], axis=1)
  return halves.reshape(-1, packed.n)


# --- power-of-two grids ------------------------------------------------------


def pack(w, bits: int, n1, *, k_tile: Optional[int] = None,
         group_size: Optional[int] = None) -> PackedPow2:
  """Packs a power-of-two weight into codes (eager, not traceable).

  Args:
    w: floating weight, ``ndim >= 2``, every value in ``P`` of ``(bits, n1)``
      (e.g. after INQ with portion 1, or COMQ with ``grid="pow2"``).
    bits: code width, an integer in 2..8.
    n1: int largest exponent: a scalar per layer (``INQState.n1``), ``(N,)``
      per output channel, or ``(groups, N)`` with ``group_size``.
    k_tile: even int, the ``K`` step of the kernel; default
      :func:`default_k_tile`.
    group_size: input rows per exponent for ``(groups, N)`` ``n1``.

  Returns:
    A :class:`PackedPow2`; :func:`unpack_matrix` gives ``w`` back exactly.

  Raises:
    ValueError: on bad ``bits``/``k_tile``/``group_size``/shapes, a traced
      ``w``, or any value of ``w`` outside ``P`` (the message counts them and
      quotes the first indices).

  References:
    Zhou et al., ICLR 2017, Sec. 2.1.
  """
  bits = pow2.check_bits(bits)
  validation.check_floating(w, "w")
  shape = tuple(jnp.shape(w))
  w2 = _matrix(w, "w")
  k, n = w2.shape
  group_size = _check_group_size(group_size)
  n1 = _check_parameter(n1, "n1", k, n, group_size, per_layer=True)
  if not jnp.issubdtype(n1.dtype, jnp.integer):
    raise ValueError(f"n1 must be an integer array, got {n1.dtype}.")
  n1 = n1.astype(jnp.int32)
  k_tile = _resolve_k_tile(k_tile, k, bits, group_size)
  n1_rows = _per_row(n1, k, n, group_size)
  which = f"n1={int(n1)}" if n1.ndim == 0 else "their n1"
  _raise_off_grid(~pow2.in_codebook(w2, bits, n1_rows),
                  f"the {bits}-bit power-of-two set for {which}; quantize "
                  "them first (INQ to portion 1)")
  codes = pow2.pow2_encode(w2, bits, n1_rows)
  return PackedPow2(data=_layout(codes, bits, k_tile), n1=n1, shape=shape,
                    bits=bits, k_tile=k_tile, group_size=group_size)


# --- uniform grids -----------------------------------------------------------


def _uniform_parameters(scale, zero_point, bits: int, k: int, n: int,
                        group_size):
  """Checked float32 scale and int32 zero point (or None)."""
  scale = _check_parameter(scale, "scale", k, n, group_size)
  validation.check_floating(scale, "scale")
  scale = scale.astype(jnp.float32)
  bad_scale = ~(jnp.isfinite(scale) & (scale > 0))
  if bool(jnp.any(bad_scale)):
    raise ValueError(f"scale must be finite and > 0; {int(bad_scale.sum())} "
                     f"of {scale.size} entries are not.")
  if zero_point is None:
    return scale, None
  zero_point = _check_parameter(zero_point, "zero_point", k, n, group_size)
  if not jnp.issubdtype(zero_point.dtype, jnp.integer):
    raise ValueError(
        f"zero_point must be an integer array, got {zero_point.dtype}.")
  zero_point = zero_point.astype(jnp.int32)
  # Every code - zero_point must have magnitude <= MAX_LEVEL_MAGNITUDE.
  low, high = 2**bits - 1 - MAX_LEVEL_MAGNITUDE, MAX_LEVEL_MAGNITUDE
  outside = (zero_point < low) | (zero_point > high)
  if bool(jnp.any(outside)):
    raise ValueError(
        f"zero_point must lie in [{low}, {high}] for {bits}-bit codes (every "
        f"code - zero_point within ±{MAX_LEVEL_MAGNITUDE}, exact in "
        f"bfloat16); {int(outside.sum())} of {zero_point.size} do not.")
  return scale, zero_point


def _uniform_values(codes: jax.Array, scale_rows: jax.Array,
                    zero_rows: jax.Array, dtype) -> jax.Array:
  """``scale · (code - zero_point)`` in float32, then cast to ``dtype``."""
  levels = (codes.astype(jnp.int32) - zero_rows).astype(jnp.float32)
  return (levels * scale_rows).astype(dtype)


def _zero_rows(zero_point, bits: int, k: int, n: int, group_size):
  """Zero points expanded to ``(K, N)``; the fixed one when None."""
  if zero_point is None:
    return jnp.full((k, n), 2**(bits - 1) - 1, jnp.int32)
  return _per_row(zero_point, k, n, group_size)


def pack_uniform(codes, scale, zero_point=None, *, bits: int,
                 group_size: Optional[int] = None,
                 k_tile: Optional[int] = None) -> PackedUniform:
  """Packs uniform-grid codes (eager, not traceable).

  .. math::  w_{kn} = s_{g(k) n}\\,(c_{kn} - z_{g(k) n}),
     \\qquad g(k) = \\lfloor k / \\mathrm{group\\_size} \\rfloor

  Args:
    codes: integer codes, ``ndim >= 2`` (matrix view ``(K, N)``), in
      ``[0, 2^bits)``, or ``[0, 2^bits - 1)`` when ``zero_point`` is None
      (e.g. ``LayerQuantization.codes`` of COMQ, RTN or GPTQ).
    scale: positive finite float scales, ``(N,)`` or ``(groups, N)``.
    zero_point: int zero points of the shape of ``scale`` (asymmetric), each
      in ``[2^bits - 257, 256]``, or None for the symmetric grid with zero
      point ``2^(bits-1) - 1``.
    bits: code width, an integer in 2..8.
    group_size: input rows per scale for ``(groups, N)`` parameters.
    k_tile: even int, the ``K`` step of the kernel (a multiple of
      ``group_size``); default :func:`default_k_tile`.

  Returns:
    A :class:`PackedUniform`; :func:`unpack_codes` gives ``codes`` back.

  Raises:
    ValueError: on bad ``bits``/``k_tile``/``group_size``, shapes or dtypes,
      traced input, a non-positive scale, a zero point out of range, or codes
      out of range (the message counts them and quotes the first indices).
  """
  bits = pow2.check_bits(bits)
  if not jnp.issubdtype(jnp.asarray(codes).dtype, jnp.integer):
    raise ValueError(
        f"codes must be an integer array, got {jnp.asarray(codes).dtype}.")
  shape = tuple(jnp.shape(codes))
  codes = _matrix(codes, "codes")
  k, n = codes.shape
  group_size = _check_group_size(group_size)
  scale, zero_point = _uniform_parameters(scale, zero_point, bits, k, n,
                                          group_size)
  k_tile = _resolve_k_tile(k_tile, k, bits, group_size)
  top = 2**bits - (1 if zero_point is None else 0)
  kind = "symmetric" if zero_point is None else "asymmetric"
  _raise_off_grid((codes < 0) | (codes >= top),
                  f"the {bits}-bit {kind} code range [0, {top - 1}]")
  return PackedUniform(data=_layout(codes, bits, k_tile), scale=scale,
                       zero_point=zero_point, shape=shape, bits=bits,
                       k_tile=k_tile, group_size=group_size)


def pack_uniform_from_values(w, scale, zero_point=None, *, bits: int,
                             group_size: Optional[int] = None,
                             k_tile: Optional[int] = None) -> PackedUniform:
  """Packs a weight whose values lie on a uniform grid (eager).

  Each code is ``round(w / scale) + zero_point``; a value is on the grid when
  that code is in range and :func:`unpack_matrix` (``float32(scale · (code -
  zero_point))`` cast to ``w.dtype``) gives the value back bit for bit.

  Args:
    w: floating weight, ``ndim >= 2``.
    scale: as :func:`pack_uniform`.
    zero_point: as :func:`pack_uniform`.
    bits: code width, an integer in 2..8.
    group_size: input rows per scale for ``(groups, N)`` parameters.
    k_tile: as :func:`pack_uniform`.

  Returns:
    A :class:`PackedUniform`; ``unpack_matrix(packed, w.dtype)`` equals ``w``.

  Raises:
    ValueError: as :func:`pack_uniform`, and when values are off the grid
      (the message counts them and quotes the first indices).
  """
  bits = pow2.check_bits(bits)
  validation.check_floating(w, "w")
  w2 = _matrix(w, "w")
  k, n = w2.shape
  group_size = _check_group_size(group_size)
  scale, zero_point = _uniform_parameters(scale, zero_point, bits, k, n,
                                          group_size)
  scale_rows = _per_row(scale, k, n, group_size)
  zero_rows = _zero_rows(zero_point, bits, k, n, group_size)
  top = 2**bits - (1 if zero_point is None else 0)
  codes = jnp.round(w2.astype(jnp.float32) / scale_rows) + zero_rows.astype(
      jnp.float32)
  in_range = (codes >= 0) & (codes < top)
  codes = jnp.where(in_range, codes, 0).astype(jnp.int32)
  exact = _uniform_values(codes, scale_rows, zero_rows, w2.dtype) == w2
  _raise_off_grid(~(in_range & exact),
                  f"the {bits}-bit grid scale · (code - zero_point), code in "
                  f"[0, {top - 1}]")
  return pack_uniform(codes.reshape(jnp.shape(w)), scale, zero_point,
                      bits=bits, group_size=group_size, k_tile=k_tile)


LAYER_GRIDS = ("asymmetric", "symmetric", "pow2", "signed")


def pack_layer_quantization(result, *, k_tile: Optional[int] = None,
                            grid: Optional[str] = None, bits: Optional[int] = None):
  """Packs a :class:`quant_core.grids.LayerQuantization` (COMQ, RTN or GPTQ result) on the
  grid and bit width it records.

  Its per-channel arrays are ``(d_out,)`` or, with groups, ``(d_out,
  groups)``; they are transposed to the ``(groups, N)`` layout here.

  * ``"asymmetric"``: :func:`pack_uniform` of ``codes``, ``scale`` and
    ``zero_point``. With the COMQ shrink factor ``scalar != 1`` the packed
    values ``scale · (code - zero_point)`` may differ from
    ``result.weights`` by 1 ulp (the result documents the same).
  * ``"symmetric"``: :func:`pack_uniform` with the fixed zero point (checked).
  * ``"signed"``: as ``"asymmetric"`` (its zero point, ``2^(bits-1)`` or
    ``2^(bits-1) - 1``, is stored per grid).
  * ``"pow2"``: :func:`pack` of ``weights`` with ``exponent`` as ``n1``.

  ``grid="offset"`` (a free float min per grid) is not packed here: its
  values are not ``scale · (code - zero_point)``; it is exported as GGUF Q4_1.

  Args:
    result: a ``LayerQuantization`` (fields ``weights``, ``codes``,
      ``scale``, ``zero_point``, ``exponent``, ``group_size``, ``bits``,
      ``grid``).
    k_tile: as :func:`pack_uniform`.
    grid, bits: optional; when given they must equal the result's own (a check
      for callers that name them).

  Returns:
    A :class:`PackedUniform` or :class:`PackedPow2`.

  Raises:
    ValueError: on a result whose ``grid`` is not one of
      :data:`LAYER_GRIDS` (``"offset"``: the message points to GGUF), a
      ``grid`` or ``bits`` that differs from the result's, a symmetric result
      whose zero points are not ``2^(bits-1) - 1``, or the errors of the
      packing functions.
  """
  for name, given in (("grid", grid), ("bits", bits)):
    if given is not None and given != getattr(result, name):
      raise ValueError(f"{name}={given!r} was passed, but the result was quantized with "
                       f"{name}={getattr(result, name)!r}; leave {name} out to use the "
                       f"result's.")
  grid = result.grid
  if grid == "offset":
    raise ValueError(
        "grid='offset' (min + scale · code, with a float min per grid) has no packed "
        f"form here: the packed file holds the grids {LAYER_GRIDS}. Export an offset "
        "result as GGUF Q4_1 (quant_core.deploy.export_gguf), or quantize with "
        "grid='signed' (GGUF Q4_0) to pack it.")
  if grid not in LAYER_GRIDS:
    raise ValueError(f"the result's grid must be one of {LAYER_GRIDS}, got {grid!r}.")
  bits = pow2.check_bits(result.bits)
  group_size = result.group_size
  per_input = lambda param: jnp.asarray(param).T  # (d_out, groups) -> (groups, N)
  if grid == "pow2":
    return pack(result.weights, bits, per_input(result.exponent),
                k_tile=k_tile, group_size=group_size)
  zero_point = per_input(result.zero_point)
  if grid == "symmetric":
    expected = 2**(bits - 1) - 1
    if bool(jnp.any(zero_point != expected)):
      raise ValueError(f"a symmetric {bits}-bit result has zero point "
                       f"{expected} everywhere, got {np.unique(zero_point)}.")
    zero_point = None
  return pack_uniform(result.codes, per_input(result.scale), zero_point,
                      bits=bits, group_size=group_size, k_tile=k_tile)


def unpack_matrix(packed, dtype=jnp.float32) -> jax.Array:
  """Inverse of the packing functions: the weight with its logical shape.

  Args:
    packed: a :class:`PackedPow2` or :class:`PackedUniform`.
    dtype: floating dtype of the result.

  Returns:
    The de-quantized values as an array of ``packed.shape``: ``±2^e`` or 0,
    or ``float32(scale · (code - zero_point))`` cast to ``dtype``.
  """
  k, n = packed.k, packed.n
  codes = unpack_codes(packed)[:k]
  if isinstance(packed, PackedPow2):
    n1_rows = _per_row(packed.n1, k, n, packed.group_size)
    values = pow2.pow2_decode(codes, packed.bits, n1_rows, dtype=dtype)
  else:
    values = _uniform_values(
        codes, _per_row(packed.scale, k, n, packed.group_size),
        _zero_rows(packed.zero_point, packed.bits, k, n, packed.group_size),
        dtype)
  return values.reshape(packed.shape)


