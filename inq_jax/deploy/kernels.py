"""Matrix product with packed power-of-two weights, as a Pallas kernel.

``shift_matmul(x, packed)`` computes ``x @ W`` for a weight ``W`` stored as
codes (:mod:`inq_jax.deploy.packing`). Each kernel step reads a tile of codes (4 or
8 bits a weight instead of 16 or 32: the bandwidth win) and decodes it in
registers/VMEM; no decoded weight is written to HBM.

Every weight is ``w = s · 2^n2 · 2^j`` with ``s`` in {-1, 0, 1} and
``j = m - 1`` in ``0..span``, ``span = n1 - n2 = 2^(bits-2) - 1``, where ``m``
is the code's magnitude field. The kernel multiplies by ``s · 2^j`` and
applies ``2^n2`` once at the end.

* Float activations (bf16, f32): ``s · 2^j`` is built exactly from its bits
  in the activation dtype, the tile product runs on the matrix units
  (``jnp.dot``, f32 accumulation), and the f32 result is scaled by ``2^n2``
  (``ldexp``, exact). Scaling by a power of two commutes with rounding, so
  this equals the f32-accumulated product with the true weights, barring
  overflow or underflow.
* int8 activations: the product is exact in integers. Multiplying by
  ``2^j`` is a left shift; the kernel builds the shifted unit ``s · (1 << j')``
  as int8 and lets an int8 x int8 -> int32 dot do the shift-and-add, which is
  identical because every term and partial sum is an integer that fits in
  int32 (bound below). An int8 weight holds ``2^j'`` only for ``j' <= 6``, so
  the exponents are split into bands of ``BAND_EXPONENTS = 7``: band ``b``
  holds the weights with ``7b <= j < 7b + 7``, with ``j' = j - 7b``. The
  result is an :class:`IntResult`, ``limbs[b]`` per band, and

  .. math::  x W = \\sum_b \\mathrm{limbs}[b] \\cdot 2^{n_2 + 7 b}

  exactly. Bands: 1 for bits 2-4, 2 for 5, 3 for 6, 5 for 7, 10 for 8.
  Overflow bound: ``|limbs[b]| <= K · 128 · 64 = K · 2^13``, so the result is
  exact for ``K <= MAX_INT_K = 2^18 - 1``; larger ``K`` raises ValueError.

Backends: TPU (Mosaic) with the ``K`` loop as the last ("arbitrary") grid
axis and the output block as the accumulator; GPU through the Triton
lowering with a ``fori_loop`` over ``K`` inside each program (the default
Mosaic GPU lowering of ``pl.pallas_call`` in jax 0.10 has no ``jnp.dot``; a
Mosaic GPU version would need ``plgpu.kernel`` with WGMMA and explicit
shared-memory pipelining); CPU runs either loop form with ``interpret=True``.
Other backends use :func:`shift_matmul_reference`.

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017 (power-of-two weights
turn multiplications into bit shifts).
"""

import functools
import math
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from inq_jax.deploy.packing import PackedPow2
from inq_jax.deploy.packing import unpack_codes

BAND_EXPONENTS = 7
MAX_INT_K = 2**18 - 1
FLOAT_DTYPES = (jnp.bfloat16, jnp.float32)
K_LOOPS = ("grid", "fori")
PLATFORMS = ("cpu", "gpu", "tpu")


class IntResult(NamedTuple):
  """Exact integer product of int8 activations with a packed weight.

  Attributes:
    limbs: int32 ``(bands, *batch, N)``; band ``b`` carries weight
      ``2^(n2 + 7 b)``.
    n2: int32 scalar, the smallest exponent of the weight's set.
  """
  limbs: jax.Array
  n2: jax.Array


def num_bands(bits: int) -> int:
  """Exponent bands of an :class:`IntResult`: ``ceil(2^(bits-2) / 7)``."""
  return -(-(2**(bits - 2)) // BAND_EXPONENTS)


def to_float(result: IntResult, dtype=jnp.float32) -> jax.Array:
  """``sum_b limbs[b] · 2^(n2 + 7b)`` in ``dtype``.

  With one band (bits <= 4) this is the exact sum correctly rounded once
  (int32 -> float conversion; the power-of-two scale is exact). With more
  bands each addition rounds again.
  """
  exponents = result.n2 + BAND_EXPONENTS * jnp.arange(
      result.limbs.shape[0], dtype=jnp.int32)
  scaled = jax.vmap(jnp.ldexp)(result.limbs.astype(dtype), exponents)
  return jnp.sum(scaled, axis=0, dtype=dtype)


# --- decoding, shared by the kernels and the reference ----------------------


def split_codes(data: jax.Array, bits: int):
  """Code tiles of a uint8 data tile as int32: ``[low, high]`` nibbles when
  two codes share a byte, else ``[codes]``. Shifts run in int32 (TPU cannot
  shift int8 vectors logically, jax#38986)."""
  data = data.astype(jnp.int32)
  if bits <= 4:
    return [data & 0xF, data >> 4]
  return [data]


def _fields(codes: jax.Array, bits: int):
  magnitude = codes & ((1 << (bits - 1)) - 1)
  negative = (codes >> (bits - 1)) == 1
  return magnitude, negative


def float_units(codes: jax.Array, bits: int, dtype) -> jax.Array:
  """``s · 2^(m-1)`` (0 where ``m == 0``) in ``dtype``, exactly.

  The f32 bit pattern ``(m - 1 + 127) << 23`` is ``2^(m-1)``; bf16 holds the
  same values (``m - 1 <= 63``).
  """
  magnitude, negative = _fields(codes, bits)
  power = jax.lax.bitcast_convert_type((magnitude + 126) << 23, jnp.float32)
  value = jnp.where(negative, -power, power)
  return jnp.where(magnitude == 0, jnp.zeros_like(value), value).astype(dtype)


def int_units(codes: jax.Array, bits: int, band: int) -> jax.Array:
  """int8 ``s · (1 << (m - 1 - 7 band))`` for codes in ``band``, else 0."""
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


def _sum(terms):
  return functools.reduce(operator.add, terms)


def tile_products(x_parts, data: jax.Array, bits: int):
  """Products of one ``K`` step, one per output band.

  Args:
    x_parts: activation tiles matching :func:`split_codes` of ``data``
      (halves of the step's columns for nibble codes).
    data: uint8 code tile.
    bits: code width.

  Returns:
    A list: ``[f32 product]`` for float activations, int32 products per
    band for int8 activations.
  """
  code_tiles = split_codes(data, bits)
  if x_parts[0].dtype == jnp.int8:
    return [
        _sum(_dot(x, int_units(c, bits, band))
             for x, c in zip(x_parts, code_tiles, strict=True))
        for band in range(num_bands(bits))
    ]
  return [
      _sum(_dot(x, float_units(c, bits, x.dtype))
           for x, c in zip(x_parts, code_tiles, strict=True))
  ]


# --- kernels ----------------------------------------------------------------


def _grid_kernel(x_ref, data_ref, out_ref, *, bits: int, parts: int):
  """One (i, j, k) step; ``out_ref`` (bands, bm, bn) accumulates over k."""
  width = x_ref.shape[1] // parts
  x_parts = [x_ref[:, p * width:(p + 1) * width] for p in range(parts)]
  products = tile_products(x_parts, data_ref[...], bits)

  @pl.when(pl.program_id(2) == 0)
  def _():
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

  for band, product in enumerate(products):
    out_ref[band] = out_ref[band] + product


def _fori_kernel(x_ref, data_ref, out_ref, *, bits: int, parts: int,
                 k_tile: int):
  """One (i, j) program looping over the ``K`` steps (Triton form)."""
  steps = x_ref.shape[1] // k_tile
  width = k_tile // parts
  rows = data_ref.shape[0] // steps

  def body(step, accs):
    x_parts = [x_ref[:, pl.ds(step * k_tile + p * width, width)]
               for p in range(parts)]
    products = tile_products(x_parts, data_ref[pl.ds(step * rows, rows), :],
                             bits)
    return tuple(a + p for a, p in zip(accs, products, strict=True))

  bands = out_ref.shape[0]
  acc_shape = out_ref.shape[1:]
  accs = jax.lax.fori_loop(
      0, steps, body,
      tuple(jnp.zeros(acc_shape, out_ref.dtype) for _ in range(bands)))
  for band in range(bands):
    out_ref[band] = accs[band]


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


def _check_inputs(x: jax.Array, packed: PackedPow2) -> None:
  if not isinstance(packed, PackedPow2):
    raise ValueError(f"packed must be a PackedPow2, got {type(packed)}.")
  if x.ndim < 1 or x.shape[-1] != packed.k:
    raise ValueError(
        f"x must have last axis K={packed.k} (weight shape {packed.shape}), "
        f"got shape {x.shape}.")
  if x.dtype != jnp.int8 and x.dtype not in FLOAT_DTYPES:
    raise ValueError(
        f"x must be bfloat16, float32 or int8, got {x.dtype}.")
  if x.dtype == jnp.int8 and packed.k > MAX_INT_K:
    raise ValueError(
        f"int8 activations are exact in int32 only for K <= {MAX_INT_K} "
        f"(K·128·64 < 2^31), got K={packed.k}.")


def _finish(out: jax.Array, x: jax.Array, packed: PackedPow2, batch):
  """Scales float results by 2^n2 or wraps integer limbs."""
  if x.dtype == jnp.int8:
    return IntResult(limbs=out.reshape(out.shape[0], *batch, packed.n),
                     n2=packed.n2)
  return jnp.ldexp(out[0], packed.n2).astype(x.dtype).reshape(
      *batch, packed.n)


def shift_matmul(x, packed: PackedPow2, *, block_m: Optional[int] = None,
                 block_n: Optional[int] = None,
                 platform: Optional[str] = None,
                 k_loop: Optional[str] = None,
                 interpret: Optional[bool] = None):
  """``x @ W`` for a packed power-of-two weight, decoded inside the kernel.

  .. math::  y_{mn} = \\sum_k x_{mk}\\, s_{kn}\\, 2^{e_{kn}}

  with ``s·2^e`` the values of ``W`` (module docstring for the arithmetic).

  Args:
    x: activations ``(..., K)``: bfloat16 or float32 (f32 accumulation on the
      matrix units) or int8 (exact integer shift-and-add).
    packed: the weight, from :func:`inq_jax.deploy.pack`, matrix view
      ``(K, N)``.
    block_m: rows of ``x`` per program; default :func:`default_blocks`.
    block_n: output columns per program; default :func:`default_blocks`.
      The ``K`` step is ``packed.k_tile``, fixed when packing.
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; default the backend of jax.
      Setting it lets a CPU host lower the GPU or TPU kernel.
    k_loop: ``"grid"`` (K as the last grid axis; TPU and CPU default) or
      ``"fori"`` (a loop inside each program; GPU default, and required there).
    interpret: run the kernel in the Pallas interpreter; default True on CPU.

  Returns:
    Float ``x``: ``(..., N)`` in ``x.dtype``. int8 ``x``: an
    :class:`IntResult` whose value is exactly ``x @ W``.

  Raises:
    ValueError: on bad shapes, dtypes, block sizes, or int8 ``K`` above
      :data:`MAX_INT_K`.

  References:
    Zhou et al., ICLR 2017, Sec. 1 and 5 (shift-based inference).
  """
  x = jnp.asarray(x)
  _check_inputs(x, packed)
  platform = platform or jax.default_backend()
  if platform not in PLATFORMS:
    return shift_matmul_reference(x, packed)
  k_loop = k_loop or ("fori" if platform == "gpu" else "grid")
  if k_loop not in K_LOOPS:
    raise ValueError(f"k_loop must be one of {K_LOOPS}, got {k_loop!r}.")
  if platform == "gpu" and k_loop != "fori":
    raise ValueError("the GPU (Triton) kernel needs k_loop='fori': Triton "
                     "programs cannot accumulate across grid steps.")
  interpret = platform == "cpu" if interpret is None else interpret

  batch = x.shape[:-1]
  m, n, k_pad, k_tile = math.prod(batch), packed.n, packed.k_padded, \
      packed.k_tile
  x2 = x.reshape(m, packed.k)
  if k_pad != packed.k:
    # Padded code rows are 0 (weight 0); activations must be finite there.
    x2 = jnp.pad(x2, ((0, 0), (0, k_pad - packed.k)))
  default_m, default_n = default_blocks(platform, m, n)
  bm = _check_block("block_m", default_m if block_m is None else block_m)
  bn = _check_block("block_n", default_n if block_n is None else block_n)
  parts = packed.codes_per_byte
  rows = k_tile // parts
  bands = num_bands(packed.bits) if x.dtype == jnp.int8 else 1
  acc_dtype = jnp.int32 if x.dtype == jnp.int8 else jnp.float32
  out_shape = jax.ShapeDtypeStruct((bands, m, n), acc_dtype)

  if k_loop == "grid":
    kernel = functools.partial(_grid_kernel, bits=packed.bits, parts=parts)
    grid = (pl.cdiv(m, bm), pl.cdiv(n, bn), k_pad // k_tile)
    in_specs = [pl.BlockSpec((bm, k_tile), lambda i, j, s: (i, s)),
                pl.BlockSpec((rows, bn), lambda i, j, s: (s, j))]
    out_spec = pl.BlockSpec((bands, bm, bn), lambda i, j, s: (0, i, j))
  else:
    kernel = functools.partial(_fori_kernel, bits=packed.bits, parts=parts,
                               k_tile=k_tile)
    grid = (pl.cdiv(m, bm), pl.cdiv(n, bn))
    in_specs = [pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((k_pad // parts, bn), lambda i, j: (0, j))]
    out_spec = pl.BlockSpec((bands, bm, bn), lambda i, j: (0, i, j))

  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=out_spec, interpret=interpret,
      compiler_params=_compiler_params(platform, k_loop),
      name=f"shift_matmul_{packed.bits}bit")(x2, packed.data)
  return _finish(out, x, packed, batch)


def shift_matmul_reference(x, packed: PackedPow2):
  """Pure-jnp version of :func:`shift_matmul` with the same contract.

  Decodes the whole weight with the same unit functions as the kernel and
  runs one dot per band; used by the tests and on backends without Pallas.

  Args:
    x: ``(..., K)`` bfloat16, float32 or int8.
    packed: a :class:`inq_jax.deploy.PackedPow2`.

  Returns:
    As :func:`shift_matmul`.
  """
  x = jnp.asarray(x)
  _check_inputs(x, packed)
  batch = x.shape[:-1]
  x2 = x.reshape(-1, packed.k)
  codes = unpack_codes(packed)[:packed.k].astype(jnp.int32)
  if x.dtype == jnp.int8:
    out = jnp.stack([_dot(x2, int_units(codes, packed.bits, band))
                     for band in range(num_bands(packed.bits))])
  else:
    out = _dot(x2, float_units(codes, packed.bits, x.dtype))[None]
  return _finish(out, x, packed, batch)
