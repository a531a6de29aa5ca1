"""Weight-only quantized matrix products: one Pallas kernel for every grid.

``quantized_matmul(x, packed)`` computes ``x @ W`` for a weight ``W`` stored
as codes (:mod:`inq_jax.deploy.packing`). Each kernel step reads a tile of
codes (2 to 8 bits a weight instead of 16 or 32: the bandwidth win) and
decodes it in registers/VMEM; no decoded weight is written to HBM. One
kernel skeleton serves every grid; only the decode step differs:

* uniform (:class:`~inq_jax.deploy.packing.PackedUniform`):
  ``w = scale · (code - zero)``. Float activations multiply by the integer
  level ``code - zero`` (|level| <= 256, exact in bfloat16); int8 activations
  by ``code - c`` with ``c = 2^(bits-1)`` (asymmetric; fits int8) plus
  ``(c - zero) · sum_k x`` (symmetric grids use ``c = zero``: no correction).
* power of two (:class:`~inq_jax.deploy.packing.PackedPow2`):
  ``w = s · 2^n2 · 2^j`` with ``s`` in {-1, 0, 1} and ``j = m - 1`` in
  ``0..2^(bits-2)-1`` (``m`` the code's magnitude field). Float activations
  multiply by ``s · 2^j``, built exactly from its bits. int8 activations use
  shift-and-add: an int8 x int8 -> int32 dot with the unit ``s · (1 << j')``,
  exponents split into bands of ``BAND_EXPONENTS = 7`` (an int8 holds
  ``2^j'`` only for ``j' <= 6``): band ``b`` holds ``7b <= j < 7b + 7`` and
  ``j' = j - 7b``. Bands: 1 for bits 2-4, 2 for 5, 3 for 6, 5 for 7, 10 for 8.

The scale (``scale``, or ``2^n2`` for power-of-two) is applied where it can
be without losing exactness:

* Per output channel or per layer (no groups): after the whole ``K`` sum.
  Float activations: the f32 sum times ``scale`` (``ldexp`` by ``n2``,
  exact, for power-of-two). int8 activations: the int32 sums are exact, then
  ``y = f32(acc) · scale`` (uniform) or ``y = sum_b ldexp(f32(limb_b),
  n2 + 7b)`` in band order (power-of-two, :func:`to_float`; one rounding for
  bits <= 4).
* Per group of ``group_size`` input rows: ``k_tile`` is a multiple of
  ``group_size`` (packing checks it), so each kernel step holds whole
  groups. Each group's partial sum (f32 for float activations, exact int32
  per band for int8) is scaled in f32 and added to an f32 accumulator, groups
  in increasing order and bands in increasing order within a group:
  ``acc <- acc + f32(P_gb) · (scale_g · 2^(7b))``.

Float activations: products of exact weight levels, f32 accumulation on the
matrix units (``Precision.HIGHEST`` for f32), result cast to ``x.dtype``.
int8 activations: the result is float32. :func:`quantized_matmul_reference`
computes the same contract in plain jnp (identical bits for int8, f32
summation order aside for float).

int32 overflow bounds (worst case per int32 sum of ``R`` rows, ``R = K``
without groups, ``group_size`` with): uniform ``R · 128 · (128 + 256)``, so
``R <= MAX_UNIFORM_INT_K = 43690``; power-of-two ``R · 128 · 64``, so
``R <= MAX_INT_K = 2^18 - 1``. Larger ``R`` raises ValueError.

Backends:

* TPU (Mosaic): the ``K`` loop is the last ("arbitrary") grid axis and the
  output block is the accumulator. Blocks respect the TPU tiling: activation
  tiles ``(block_m, k_tile)`` with ``k_tile/2`` a multiple of 128 lanes
  (:func:`~inq_jax.deploy.packing.default_k_tile`), code tiles of
  ``k_tile/2`` rows (multiple of 32 int8 sublanes), parameter blocks
  ``(1, k_tile/group_size, block_n)`` whose last two dims equal the array's
  or are lane multiples. Group-wise grids should use a ``group_size`` that is
  a multiple of 128 there, so that a group's activation slice is
  lane-aligned (only that case is lowered in the tests).
* GPU: the Triton lowering with a ``fori_loop`` over ``K`` inside each
  program (Triton programs cannot accumulate across grid steps). Mosaic GPU,
  the default GPU lowering of ``pl.pallas_call`` in jax 0.10.2, cannot
  express the tile product; lowering this kernel through it raises
  ``NotImplementedError: Unimplemented primitive in Pallas Mosaic GPU
  lowering: dot_general for lowering semantics LoweringSemantics.Lane and
  user thread semantics PrimitiveSemantics.Warpgroup`` (the same with
  ``LoweringSemantics.Warpgroup``). A Mosaic GPU version needs ``plgpu.kernel``
  with explicit shared-memory pipelining and ``plgpu.wgmma``, a different
  skeleton. Triton dots need chunk sizes (``k_tile/2``, ``group_size``) of
  at least 16.
* CPU: either loop form with ``interpret=True``. Other backends use the
  reference.

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017 (power-of-two weights
turn multiplications into bit shifts).
"""

import dataclasses
import functools
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from inq_jax.deploy import packing
from inq_jax.deploy.packing import PackedPow2

BAND_EXPONENTS = 7
MAX_INT_K = 2**18 - 1
MAX_UNIFORM_INT_K = (2**31 - 1) // (128 * (128 + packing.MAX_LEVEL_MAGNITUDE))
FLOAT_DTYPES = (jnp.bfloat16, jnp.float32)
K_LOOPS = ("grid", "fori")
PLATFORMS = ("cpu", "gpu", "tpu")


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


# --- decoding, shared by the kernel and the reference -----------------------


def split_codes(data: jax.Array, bits: int):
  """Code tiles of a uint8 data tile as int32: ``[low, high]`` nibbles when
  two codes share a byte, else ``[codes]``. Shifts run in int32 (TPU cannot
  shift int8 vectors logically, jax#38986)."""
  data = data.astype(jnp.int32)
  if bits <= packing.NIBBLE_BITS:
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
class _Plan:
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
    return packing.codes_per_byte(self.bits)

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


def _products(plan: _Plan, x: jax.Array, codes: jax.Array, zero):
  """``x @ levels(codes)`` for one chunk: a list, one entry per band.

  Args:
    plan: the product's :class:`_Plan`.
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


def _scaled_sum(acc: jax.Array, group_products, scales):
  """``acc + f32(P_gb) · (scale_g · 2^(7b))``, groups then bands in order."""
  for products, scale in zip(group_products, scales, strict=True):
    for band, product in enumerate(products):
      acc = acc + product.astype(jnp.float32) * (
          scale * float(2**(BAND_EXPONENTS * band)))
  return acc


# --- kernel -----------------------------------------------------------------


def _accumulate_step(plan: _Plan, accs, read_x, read_data, read_param,
                     zero_ref, scale_ref):
  """One ``K`` step of the kernel: the decode-and-dot of every chunk.

  Args:
    plan: the product's :class:`_Plan`.
    accs: accumulators, one per output band, ``(bm, bn)``.
    read_x: ``(start, size) ->`` activation columns of the step.
    read_data: ``(row, size) ->`` byte rows of the step's code tile.
    read_param: ``(ref, group) ->`` the ``(1, bn)`` parameter row of the
      step's group.
    zero_ref: zero points (asymmetric uniform grids), else None.
    scale_ref: per-group scales (group-wise grids), else None.

  Returns:
    The updated accumulators.
  """
  group_products = [None] * plan.groups_per_tile
  for chunk in range(plan.part_rows // plan.chunk_rows):
    row = chunk * plan.chunk_rows
    parts = split_codes(read_data(row, plan.chunk_rows), plan.bits)
    for part, codes in enumerate(parts):
      start = part * plan.part_rows + row
      group = start // plan.group_size if plan.tile_scales else 0
      zero = read_param(zero_ref, group) if plan.has_zero else None
      products = _products(plan, read_x(start, plan.chunk_rows), codes, zero)
      previous = group_products[group]
      group_products[group] = products if previous is None else [
          a + b for a, b in zip(previous, products, strict=True)]
  if not plan.tile_scales:
    return [acc + p for acc, p in zip(accs, group_products[0], strict=True)]
  scales = [read_param(scale_ref, group)
            for group in range(plan.groups_per_tile)]
  return [_scaled_sum(accs[0], group_products, scales)]


def _split_refs(plan: _Plan, refs):
  """``(zero_ref, scale_ref, out_ref)`` from the kernel's trailing refs."""
  refs = list(refs)
  zero_ref = refs.pop(0) if plan.has_zero else None
  scale_ref = refs.pop(0) if plan.tile_scales else None
  (out_ref,) = refs
  return zero_ref, scale_ref, out_ref


def _readers(plan: _Plan, x_ref, data_ref, step):
  """Readers of ``K`` step ``step`` (0 in the grid form, where the blocks
  are the step's own)."""
  x_start, data_start = step * plan.k_tile, step * plan.part_rows
  param_step = step if plan.tile_scales else 0
  return (lambda start, size: x_ref[:, pl.ds(x_start + start, size)],
          lambda row, size: data_ref[pl.ds(data_start + row, size), :],
          lambda ref, group: ref[param_step, pl.ds(group, 1), :])


def _grid_kernel(x_ref, data_ref, *refs, plan: _Plan):
  """One (i, j, k) step; ``out_ref`` (bands, bm, bn) accumulates over k."""
  zero_ref, scale_ref, out_ref = _split_refs(plan, refs)

  @pl.when(pl.program_id(2) == 0)
  def _():
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

  accs = _accumulate_step(plan, [out_ref[b] for b in range(out_ref.shape[0])],
                          *_readers(plan, x_ref, data_ref, 0), zero_ref,
                          scale_ref)
  for band, acc in enumerate(accs):
    out_ref[band] = acc


def _fori_kernel(x_ref, data_ref, *refs, plan: _Plan):
  """One (i, j) program looping over the ``K`` steps (Triton form)."""
  zero_ref, scale_ref, out_ref = _split_refs(plan, refs)

  def body(step, accs):
    return tuple(_accumulate_step(plan, list(accs),
                                  *_readers(plan, x_ref, data_ref, step),
                                  zero_ref, scale_ref))

  accs = jax.lax.fori_loop(
      0, x_ref.shape[1] // plan.k_tile, body,
      tuple(jnp.zeros(out_ref.shape[1:], out_ref.dtype)
            for _ in range(out_ref.shape[0])))
  for band, acc in enumerate(accs):
    out_ref[band] = acc


# --- wrapper ----------------------------------------------------------------


def _next_pow2(value: int) -> int:
  return 1 << max(value - 1, 0).bit_length()


def default_blocks(platform: str, m: int, n: int):
  """``(block_m, block_n)`` per backend (untuned starting points).

  GPU (Triton): powers of two >= 16 (tl.dot); small ``M`` gets narrow ``N``
  blocks so that more programs stream the weight. TPU: the full dim or a
  multiple of 128 lanes / 32 int8 sublanes. CPU interpret: large blocks,
  fewer grid steps.
  """
  if platform == "gpu":
    if m <= 64:
      return max(16, _next_pow2(m)), max(16, min(64, _next_pow2(n)))
    return 128, max(16, min(128, _next_pow2(n)))
  if platform == "tpu":
    return (m if m <= 512 else 512), (n if n <= 512 else 512)
  return min(m, 256), min(n, 256)


def _check_block(name: str, value) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def _compiler_params(platform: str, k_loop: str):
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=4, num_stages=3)
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    semantics = (("parallel", "parallel", "arbitrary") if k_loop == "grid"
                 else ("parallel", "parallel"))
    return pltpu.CompilerParams(dimension_semantics=semantics)
  return None


def _plan(x: jax.Array, packed) -> _Plan:
  """Checks ``x`` against ``packed`` and describes their product."""
  if not packing.is_packed(packed):
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
  return _Plan(pow2=is_pow2, bits=packed.bits,
               symmetric=not is_pow2 and packed.symmetric,
               integer=x.dtype == jnp.int8, k_tile=packed.k_tile,
               group_size=packed.group_size)


def _group_scales(packed) -> jax.Array:
  """``(groups, N)`` f32 scales of a group-wise weight (``2^n2`` for
  power-of-two: exact while ``n2 >= -126``)."""
  if isinstance(packed, PackedPow2):
    return jnp.ldexp(jnp.ones(packed.n2.shape, jnp.float32), packed.n2)
  return packed.scale


def _kernel_parameters(plan: _Plan, packed):
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


def _pallas_accumulators(x2, packed, plan: _Plan, *, platform, k_loop,
                         interpret, block_m, block_n) -> jax.Array:
  """The kernel call: ``(out_bands, M, N)`` accumulators."""
  m, n = x2.shape[0], packed.n
  k_pad, k_tile = packed.k_padded, plan.k_tile
  default_m, default_n = default_blocks(platform, m, n)
  bm = _check_block("block_m", default_m if block_m is None else block_m)
  bn = _check_block("block_n", default_n if block_n is None else block_n)
  params = [p for p in _kernel_parameters(plan, packed) if p is not None]
  out_shape = jax.ShapeDtypeStruct((plan.out_bands, m, n), plan.acc_dtype)
  if k_loop == "grid":
    kernel = _grid_kernel
    grid = (pl.cdiv(m, bm), pl.cdiv(n, bn), k_pad // k_tile)
    param_step = (lambda s: s) if plan.tile_scales else (lambda s: 0)
    in_specs = [pl.BlockSpec((bm, k_tile), lambda i, j, s: (i, s)),
                pl.BlockSpec((plan.part_rows, bn), lambda i, j, s: (s, j))]
    in_specs += [pl.BlockSpec((1, p.shape[1], bn),
                              lambda i, j, s: (param_step(s), 0, j))
                 for p in params]
    out_spec = pl.BlockSpec(out_shape.shape[:1] + (bm, bn),
                            lambda i, j, s: (0, i, j))
  else:
    kernel = _fori_kernel
    grid = (pl.cdiv(m, bm), pl.cdiv(n, bn))
    in_specs = [pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((k_pad // plan.parts, bn), lambda i, j: (0, j))]
    in_specs += [pl.BlockSpec(p.shape[:2] + (bn,), lambda i, j: (0, 0, j))
                 for p in params]
    out_spec = pl.BlockSpec(out_shape.shape[:1] + (bm, bn),
                            lambda i, j: (0, i, j))
  kind = "pow2" if plan.pow2 else "uniform"
  return pl.pallas_call(
      functools.partial(kernel, plan=plan), out_shape=out_shape, grid=grid,
      in_specs=in_specs, out_specs=out_spec, interpret=interpret,
      compiler_params=_compiler_params(platform, k_loop),
      name=f"quantized_matmul_{kind}_{plan.bits}bit")(x2, packed.data,
                                                       *params)


def _reference_accumulators(x2, packed, plan: _Plan) -> jax.Array:
  """The kernel's accumulators in plain jnp, the whole ``K`` (or each group)
  in one dot."""
  codes = packing.unpack_codes(packed).astype(jnp.int32)
  zero, scale = (None if p is None else p.reshape(-1, packed.n)
                 for p in _kernel_parameters(plan, packed))
  if not plan.tile_scales:
    return jnp.stack(_products(plan, x2, codes, zero))
  size = plan.group_size
  groups = range(packed.k_padded // size)
  group_products = [
      _products(plan, x2[:, g * size:(g + 1) * size],
                codes[g * size:(g + 1) * size],
                None if zero is None else zero[g:g + 1])
      for g in groups]
  scales = [scale[g:g + 1] for g in groups]
  acc = jnp.zeros((x2.shape[0], packed.n), jnp.float32)
  return _scaled_sum(acc, group_products, scales)[None]


def _result(out: jax.Array, x: jax.Array, packed, plan: _Plan):
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


def _accumulators(x, packed, *, use_kernel: bool, block_m=None, block_n=None,
                  platform=None, k_loop=None, interpret=None):
  """Checked inputs -> ``(accumulators, plan, x as an array)``, from the
  kernel or, with ``use_kernel=False`` or an unknown platform, the
  reference."""
  x = jnp.asarray(x)
  plan = _plan(x, packed)
  platform = platform or jax.default_backend()
  x2 = x.reshape(-1, packed.k)
  if packed.k_padded != packed.k:
    # Padded code rows multiply these zeros; activations must be finite.
    x2 = jnp.pad(x2, ((0, 0), (0, packed.k_padded - packed.k)))
  if not use_kernel or platform not in PLATFORMS:
    return _reference_accumulators(x2, packed, plan), plan, x
  k_loop = k_loop or ("fori" if platform == "gpu" else "grid")
  if k_loop not in K_LOOPS:
    raise ValueError(f"k_loop must be one of {K_LOOPS}, got {k_loop!r}.")
  if platform == "gpu" and k_loop != "fori":
    raise ValueError("the GPU (Triton) kernel needs k_loop='fori': Triton "
                     "programs cannot accumulate across grid steps.")
  interpret = platform == "cpu" if interpret is None else interpret
  out = _pallas_accumulators(x2, packed, plan, platform=platform,
                             k_loop=k_loop, interpret=interpret,
                             block_m=block_m, block_n=block_n)
  return out, plan, x


def quantized_matmul(x, packed, *, block_m: Optional[int] = None,
                     block_n: Optional[int] = None,
                     platform: Optional[str] = None,
                     k_loop: Optional[str] = None,
                     interpret: Optional[bool] = None) -> jax.Array:
  """``x @ W`` for a packed weight, decoded inside one Pallas kernel.

  .. math::  y_{mn} = \\sum_g s_{gn} \\sum_{k \\in g} x_{mk}\\, l_{kn}

  with ``l`` the integer (uniform) or power-of-two level of each code and
  ``s`` its scale (one group per output channel without ``group_size``);
  the module docstring gives the exact arithmetic and rounding.

  Args:
    x: activations ``(..., K)``: bfloat16 or float32 (f32 accumulation on the
      matrix units) or int8 (exact int32 sums, scaled in f32).
    packed: a :class:`~inq_jax.deploy.packing.PackedUniform` or
      :class:`~inq_jax.deploy.packing.PackedPow2`, matrix view ``(K, N)``.
    block_m: rows of ``x`` per program; default :func:`default_blocks`.
    block_n: output columns per program; default :func:`default_blocks`.
      The ``K`` step is ``packed.k_tile``, fixed when packing.
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; default the backend of jax.
      Setting it lets a CPU host lower the GPU or TPU kernel.
    k_loop: ``"grid"`` (K as the last grid axis; TPU and CPU default) or
      ``"fori"`` (a loop inside each program; GPU default, and required there).
    interpret: run the kernel in the Pallas interpreter; default True on CPU.

  Returns:
    ``(..., N)`` in ``x.dtype`` for float ``x``, float32 for int8 ``x``.

  Raises:
    ValueError: on bad shapes, dtypes, block sizes or ``k_loop``, or int8
      ``x`` with more rows per int32 sum than the overflow bound allows.
  """
  out, plan, x = _accumulators(x, packed, use_kernel=True, block_m=block_m,
                               block_n=block_n, platform=platform,
                               k_loop=k_loop, interpret=interpret)
  result = _result(out, x, packed, plan)
  return to_float(result) if isinstance(result, IntResult) else result


def quantized_matmul_reference(x, packed) -> jax.Array:
  """Pure-jnp version of :func:`quantized_matmul` with the same contract.

  Decodes the whole weight with the kernel's decode functions and runs one
  dot per band (per group and band with group-wise scales); used by the
  tests and on backends without Pallas.

  Args:
    x: ``(..., K)`` bfloat16, float32 or int8.
    packed: a packed weight.

  Returns:
    As :func:`quantized_matmul`.
  """
  out, plan, x = _accumulators(x, packed, use_kernel=False)
  result = _result(out, x, packed, plan)
  return to_float(result) if isinstance(result, IntResult) else result


def _check_shift_inputs(x, packed) -> None:
  if not isinstance(packed, PackedPow2):
    raise ValueError(f"packed must be a PackedPow2, got {type(packed)}.")
  if jnp.asarray(x).dtype == jnp.int8 and packed.group_size is not None:
    raise ValueError("shift_matmul returns exact int32 limbs, which needs "
                     "one exponent per channel or layer; use "
                     "quantized_matmul for group-wise exponents.")


def shift_matmul(x, packed: PackedPow2, *, block_m: Optional[int] = None,
                 block_n: Optional[int] = None,
                 platform: Optional[str] = None,
                 k_loop: Optional[str] = None,
                 interpret: Optional[bool] = None):
  """:func:`quantized_matmul` for a power-of-two weight, exact for int8.

  Args:
    x: ``(..., K)`` bfloat16, float32 or int8.
    packed: a :class:`~inq_jax.deploy.packing.PackedPow2` (with int8 ``x``,
      ``n1`` per layer or per channel).
    block_m: as for :func:`quantized_matmul`.
    block_n: as for :func:`quantized_matmul`.
    platform: as for :func:`quantized_matmul`.
    k_loop: as for :func:`quantized_matmul`.
    interpret: as for :func:`quantized_matmul`.

  Returns:
    Float ``x``: ``(..., N)`` in ``x.dtype``. int8 ``x``: an
    :class:`IntResult` whose value is exactly ``x @ W``.

  References:
    Zhou et al., ICLR 2017, Sec. 1 and 5 (shift-based inference).
  """
  _check_shift_inputs(x, packed)
  out, plan, x = _accumulators(x, packed, use_kernel=True, block_m=block_m,
                               block_n=block_n, platform=platform,
                               k_loop=k_loop, interpret=interpret)
  return _result(out, x, packed, plan)


def shift_matmul_reference(x, packed: PackedPow2):
  """Pure-jnp version of :func:`shift_matmul` with the same contract."""
  _check_shift_inputs(x, packed)
  out, plan, x = _accumulators(x, packed, use_kernel=False)
  return _result(out, x, packed, plan)
