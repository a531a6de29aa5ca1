"""The arithmetic of the weight-only matmul, shared by the Pallas kernels and their
jnp reference: a decode step per grid, the plan of one product, and the product in
plain jnp.

:mod:`quant_core.deploy.kernels` runs these steps inside one ``pallas_call``
skeleton; its module docstring gives the exact arithmetic, the rounding and the
int32 overflow bounds. Nothing here imports Pallas.
"""

import dataclasses
import functools
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from quant_core.deploy import codes as packed_codes
from quant_core.deploy.codes import PackedPow2


BAND_EXPONENTS = 7


MAX_INT_K = 2**18 - 1


MAX_UNIFORM_INT_K = (2**31 - 1) // (128 * (128 + packed_codes.MAX_LEVEL_MAGNITUDE))


FLOAT_DTYPES = (jnp.bfloat16, jnp.float32)


class IntResult(NamedTuple):
  """Exact integer product of int8 activations with a packed weight.

  Attributes:
    limbs: int32 ``(bands, *batch, N)``; band ``b`` carries weight
      ``2^(n2 + 7 b)``.
    n2: int32 smallest exponent of the weight's set, ``()`` or ``(N,)``.
  """
  limbs: jax.Array
  n2: jax.Array


def num_bands(bits: int) -> int:
  """Exponent bands of an :class:`IntResult`: ``ceil(2^(bits-2) / 7)``."""
  return -(-(2**(bits - 2)) // BAND_EXPONENTS)


def _sum(terms):
  """Left-to-right sum: a fixed order, so kernel and reference agree."""
  return functools.reduce(operator.add, terms)


def to_float(result: IntResult, dtype=jnp.float32) -> jax.Array:
  """``sum_b limbs[b] · 2^(n2 + 7b)`` in ``dtype``, bands added in order.

  With one band (bits <= 4) this is the exact sum correctly rounded once
  (int32 -> float conversion; the power-of-two scale is exact). With more
  bands each addition rounds again.
  """
  per_band = result.limbs.shape[1:]
  n2 = result.n2.reshape((1,) * (len(per_band) - result.n2.ndim) +
                         result.n2.shape)
  return _sum(jnp.ldexp(limb.astype(dtype), n2 + BAND_EXPONENTS * band)
              for band, limb in enumerate(result.limbs))


def split_codes(data: jax.Array, bits: int):
  """Code tiles of a uint8 data tile as int32: ``[low, high]`` nibbles when
  two codes share a byte, else ``[codes]``. Shifts run in int32 (TPU cannot
  shift int8 vectors logically, jax#38986)."""
  data = data.astype(jnp.int32)
  if bits <= packed_codes.NIBBLE_BITS:
    return [data & 0xF, data >> 4]
  return [data]


def _fields(codes: jax.Array, bits: int):
  magnitude = codes & ((1 << (bits - 1)) - 1)
  negative = (codes >> (bits - 1)) == 1
  return magnitude, negative


def float_units(codes: jax.Array, bits: int, dtype) -> jax.Array:
  """Power-of-two ``s · 2^(m-1)`` (0 where ``m == 0``) in ``dtype``, exactly.

  The f32 bit pattern ``(m - 1 + 127) << 23`` is ``2^(m-1)``; bf16 holds the
  same values (``m - 1 <= 63``).
  """
  magnitude, negative = _fields(codes, bits)
  power = jax.lax.bitcast_convert_type((magnitude + 126) << 23, jnp.float32)
  value = jnp.where(negative, -power, power)
  return jnp.where(magnitude == 0, jnp.zeros_like(value), value).astype(dtype)


def int_units(codes: jax.Array, bits: int, band: int) -> jax.Array:
  """Power-of-two int8 ``s · (1 << (m - 1 - 7 band))`` in ``band``, else 0."""
  magnitude, negative = _fields(codes, bits)
  shift = magnitude - 1 - BAND_EXPONENTS * band
  in_band = (magnitude > 0) & (shift >= 0) & (shift < BAND_EXPONENTS)
  unit = jnp.left_shift(jnp.ones_like(shift),
                        jnp.clip(shift, 0, BAND_EXPONENTS - 1))
  unit = jnp.where(negative, -unit, unit)
  return jnp.where(in_band, unit, jnp.zeros_like(unit)).astype(jnp.int8)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
  if x.dtype == jnp.int8:
    return jnp.dot(x, w, preferred_element_type=jnp.int32)
  # HIGHEST keeps f32 activations out of TF32/bf16 passes.
  precision = (jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else
               jax.lax.Precision.DEFAULT)
  return jnp.dot(x, w, precision=precision,
                 preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one product: grid kind, activations, tiling."""
  pow2: bool
  bits: int
  symmetric: bool
  integer: bool
  k_tile: int
  group_size: Optional[int]

  @property
  def parts(self) -> int:
    """Codes per byte: the K step is split into this many part tiles."""
    return packed_codes.codes_per_byte(self.bits)

  @property
  def part_rows(self) -> int:
    return self.k_tile // self.parts

  @property
  def chunk_rows(self) -> int:
    """Rows of one dot: a part tile, or one group when groups are smaller."""
    if self.group_size is None:
      return self.part_rows
    return min(self.group_size, self.part_rows)

  @property
  def groups_per_tile(self) -> int:
    return 1 if self.group_size is None else self.k_tile // self.group_size

  @property
  def bands(self) -> int:
    return num_bands(self.bits) if self.pow2 and self.integer else 1

  @property
  def has_zero(self) -> bool:
    """The kernel reads zero points (asymmetric uniform grids)."""
    return not self.pow2 and not self.symmetric

  @property
  def tile_scales(self) -> bool:
    """Scales are applied per group inside the kernel."""
    return self.group_size is not None

  @property
  def out_bands(self) -> int:
    return 1 if self.tile_scales else self.bands

  @property
  def acc_dtype(self):
    return jnp.int32 if self.integer and not self.tile_scales else jnp.float32

  @property
  def center(self) -> int:
    """Code subtracted for int8 units: the zero point itself when it is
    fixed (symmetric), else the middle code ``2^(bits-1)``."""
    return 2**(self.bits - 1) - 1 if self.symmetric else 2**(self.bits - 1)


def products(plan: Plan, x: jax.Array, codes: jax.Array, zero):
  """``x @ levels(codes)`` for one chunk: a list, one entry per band.

  Args:
    plan: the product's :class:`Plan`.
    x: activation columns of the chunk, ``(bm, rows)``.
    codes: int32 codes of the chunk, ``(rows, bn)``.
    zero: int32 zero points ``(1, bn)`` of the chunk's group (asymmetric
      uniform grids), else None.

  Returns:
    f32 (float ``x``) or exact int32 (int8 ``x``) products, unscaled.
  """
  if plan.pow2:
    if plan.integer:
      return [_dot(x, int_units(codes, plan.bits, band))
              for band in range(plan.bands)]
    return [_dot(x, float_units(codes, plan.bits, x.dtype))]
  if not plan.integer:
    return [_dot(x, (codes - (plan.center if zero is None else zero)
                     ).astype(x.dtype))]
  product = _dot(x, (codes - plan.center).astype(jnp.int8))
  if zero is not None:
    row_sums = jnp.sum(x.astype(jnp.int32), axis=1, keepdims=True)
    product = product + (plan.center - zero) * row_sums
  return [product]


def scaled_sum(acc: jax.Array, group_products, scales):
  """``acc + f32(P_gb) · (scale_g · 2^(7b))``, groups then bands in order."""
  for products, scale in zip(group_products, scales, strict=True):
    for band, product in enumerate(products):
      acc = acc + product.astype(jnp.float32) * (
          scale * float(2**(BAND_EXPONENTS * band)))
  return acc


def plan_product(x: jax.Array, packed) -> Plan:
  """Checks ``x`` against ``packed`` and describes their product."""
  if not packed_codes.is_packed(packed):
    raise ValueError("packed must be a PackedPow2 or PackedUniform, got "
                     f"{type(packed)}.")
  if x.ndim < 1 or x.shape[-1] != packed.k:
    raise ValueError(
        f"x must have last axis K={packed.k} (weight shape {packed.shape}), "
        f"got shape {x.shape}.")
  if x.dtype != jnp.int8 and x.dtype not in FLOAT_DTYPES:
    raise ValueError(
        f"x must be bfloat16, float32 or int8, got {x.dtype}.")
  is_pow2 = isinstance(packed, PackedPow2)
  if x.dtype == jnp.int8:
    limit = MAX_INT_K if is_pow2 else MAX_UNIFORM_INT_K
    rows = packed.k if packed.group_size is None else packed.group_size
    if rows > limit:
      raise ValueError(
          f"int8 activations are exact in int32 for at most {limit} rows per "
          f"int32 sum, got {rows}; allowed: K <= {limit} without groups, "
          f"group_size <= {limit} with.")
  return Plan(pow2=is_pow2, bits=packed.bits,
               symmetric=not is_pow2 and packed.symmetric,
               integer=x.dtype == jnp.int8, k_tile=packed.k_tile,
               group_size=packed.group_size)


def _group_scales(packed) -> jax.Array:
  """``(groups, N)`` f32 scales of a group-wise weight (``2^n2`` for
  power-of-two: exact while ``n2 >= -126``)."""
  if isinstance(packed, PackedPow2):
    return jnp.ldexp(jnp.ones(packed.n2.shape, jnp.float32), packed.n2)
  return packed.scale


def kernel_parameters(plan: Plan, packed):
  """``(zero, scale)`` inputs of the kernel, each None when not read, else
  ``(steps or 1, groups per tile or 1, N)``: one row per group of each ``K``
  step, or one row for all steps."""
  zero = packed.zero_point if plan.has_zero else None
  scale = _group_scales(packed) if plan.tile_scales else None
  if plan.group_size is None:
    return zero if zero is None else zero.reshape(1, 1, packed.n), scale
  pad = packed.k_padded // plan.group_size - packed.num_groups
  # Groups of padding rows multiply zero activations; any value works.
  by_step = lambda p: None if p is None else jnp.pad(
      p, ((0, pad), (0, 0))).reshape(-1, plan.groups_per_tile, packed.n)
  return by_step(zero), by_step(scale)


def reference_accumulators(x2, packed, plan: Plan) -> jax.Array:
  """The kernel's accumulators in plain jnp, the whole ``K`` (or each group)
  in one dot."""
  codes = packed_codes.unpack_codes(packed).astype(jnp.int32)
  zero, scale = (None if p is None else p.reshape(-1, packed.n)
                 for p in kernel_parameters(plan, packed))
  if not plan.tile_scales:
    return jnp.stack(products(plan, x2, codes, zero))
  size = plan.group_size
  groups = range(packed.k_padded // size)
  group_products = [
      products(plan, x2[:, g * size:(g + 1) * size],
                codes[g * size:(g + 1) * size],
                None if zero is None else zero[g:g + 1])
      for g in groups]
  scales = [scale[g:g + 1] for g in groups]
  acc = jnp.zeros((x2.shape[0], packed.n), jnp.float32)
  return scaled_sum(acc, group_products, scales)[None]


def result_of(out: jax.Array, x: jax.Array, packed, plan: Plan):
  """Accumulators -> :class:`IntResult` (power-of-two, int8, no groups) or
  the scaled product (``x.dtype``, float32 for int8 ``x``)."""
  batch, n = x.shape[:-1], packed.n
  if plan.tile_scales:
    y = out[0]
  elif plan.pow2:
    if plan.integer:
      return IntResult(limbs=out.reshape(out.shape[0], *batch, n),
                       n2=packed.n2)
    n2 = packed.n2.reshape((1,) * (2 - packed.n2.ndim) + packed.n2.shape)
    y = jnp.ldexp(out[0], n2)
  else:
    y = out[0].astype(jnp.float32) * packed.scale.reshape(1, n)
  out_dtype = jnp.float32 if plan.integer else x.dtype
  return y.astype(out_dtype).reshape(*batch, n)
