"""The INQ power-of-two rule and its integer code format.

Reference: A. Zhou, A. Yao, Y. Guo, L. Xu, Y. Chen, "Incremental Network
Quantization: Towards Lossless CNNs with Low-Precision Weights", ICLR 2017,
Sec. 2.1 (Eqs. 1-4).

For a layer quantized to ``b`` bits with ``s = max|w|``::

    n1 = floor(log2(4 s / 3))
    n2 = n1 + 1 - 2^(b-1) / 2
    P  = {0, ±2^n2, ..., ±2^n1}

One bit flags zero and ``b - 1`` bits index ``2^(b-2)`` signed magnitudes, so
``P`` has ``2^(b-1) + 1`` values (2 bits is ternary ``{0, ±2^n1}``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import validation

MIN_BITS = 2
MAX_BITS = 8

# n1 of a layer whose weights are all zero: every value of such a layer
# quantizes to 0 (it has no scale), and it stays zero.
ZERO_LAYER_N1 = -(2**20)


def check_bits(bits) -> int:
  """Returns ``bits`` if it is an integer in 2..8, else raises ValueError."""
  if isinstance(bits, (bool, np.bool_)) or not isinstance(
      bits, (int, np.integer)):
    raise ValueError(
        f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}.")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(
        f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}.")
  return int(bits)


def num_magnitudes(bits: int) -> int:
  """Number of distinct non-zero magnitudes, ``2^(bits-2)``."""
  return 2 ** (check_bits(bits) - 2)


def _round_exponent(abs_value: jax.Array) -> jax.Array:
  """The k with 0.75·2^k <= v < 1.5·2^k, exactly (ties take the larger k).

  Uses ``frexp`` rather than ``log2`` so values on a threshold are never
  misrounded: v = m·2^E with m in [0.5, 1), hence floor(log2 v) = E - 1 and
  the midpoint 1.5·2^(E-1) corresponds to m = 0.75.
  """
  mantissa, exponent = jnp.frexp(abs_value)
  round_up = (mantissa >= 0.75).astype(jnp.int32)
  return exponent.astype(jnp.int32) - 1 + round_up


def pow2_exponents(max_abs, bits: int):
  """Exponent range ``(n1, n2)`` of the power-of-two set of a layer.

  .. math::

    n_1 = \\lfloor \\log_2(4 s / 3) \\rfloor, \\qquad
    n_2 = n_1 + 1 - 2^{b-1} / 2

  ``n1`` is computed exactly (no ``log2`` rounding): it is the integer with
  ``0.75·2^n1 <= s < 1.5·2^n1``. A layer with ``s == 0`` gets the sentinel
  :data:`ZERO_LAYER_N1`, under which every value quantizes to 0.

  Args:
    max_abs: ``s = max|w|`` of the layer (a scalar or an array of scalars).
    bits: bit width, an integer in 2..8.

  Returns:
    ``(n1, n2)`` as int32 arrays of the shape of ``max_abs``.

  References:
    Zhou et al., ICLR 2017, Eqs. 2-3.
  """
  bits = check_bits(bits)
  max_abs = jnp.asarray(max_abs)
  n1 = jnp.where(max_abs > 0, _round_exponent(max_abs),
                 jnp.int32(ZERO_LAYER_N1))
  return n1, n1 + 1 - num_magnitudes(bits)


def pow2_quantize(w, bits: int, *, n1=None) -> jax.Array:
  """Rounds ``w`` onto ``P = {0, ±2^n2, ..., ±2^n1}`` with the INQ rule.

  .. math::

    \\hat w = \\begin{cases}
      \\mathrm{sgn}(w)\\,2^{k} & 0.75\\cdot2^k \\le |w| < 1.5\\cdot2^k,
          \\; n_2 < k < n_1 \\\\
      \\mathrm{sgn}(w)\\,2^{n_2} & 2^{n_2-1} \\le |w| < 1.5\\cdot2^{n_2} \\\\
      \\mathrm{sgn}(w)\\,2^{n_1} & |w| \\ge 0.75\\cdot2^{n_1} \\\\
      0 & |w| < 2^{n_2-1}
    \\end{cases}

  A value exactly on a threshold takes the larger level, and values at or
  above ``1.5·2^n1`` clamp to ``2^n1`` (a weight that grew after ``n1`` was
  fixed never vanishes).

  Args:
    w: weights, any shape and floating dtype.
    bits: bit width, an integer in 2..8.
    n1: optional int scalar, the largest exponent. When omitted it is computed
      from ``max|w|`` with :func:`pow2_exponents`.

  Returns:
    The quantized values, same shape and dtype as ``w``.

  Raises:
    ValueError: on bad ``bits``, a non-floating ``w``, or (when ``w`` is
      concrete) NaN or inf values.

  References:
    Zhou et al., ICLR 2017, Eq. 4.
  """
  bits = check_bits(bits)
  w = jnp.asarray(w)
  validation.check_floating(w, "w")
  validation.check_finite(w, "w")
  if n1 is None:
    n1, _ = pow2_exponents(jnp.max(jnp.abs(w)), bits)
  return _quantize_core(w, jnp.asarray(n1, jnp.int32), bits)


@functools.partial(jax.jit, static_argnums=2)
def _quantize_core(w: jax.Array, n1: jax.Array, bits: int) -> jax.Array:
  n2 = n1 + 1 - num_magnitudes(bits)
  abs_w = jnp.abs(w)
  exponent = jnp.clip(_round_exponent(abs_w), n2, n1)
  magnitude = jnp.ldexp(jnp.ones_like(w), exponent)
  # 2^(n2-1) is the midpoint between 0 and 2^n2; at it, round up.
  keep = (abs_w >= jnp.ldexp(jnp.ones_like(w), n2 - 1)) & (
      n1 != ZERO_LAYER_N1)
  return jnp.where(keep, jnp.where(w < 0, -magnitude, magnitude),
                   jnp.zeros_like(w))


def in_codebook(w, bits: int, n1) -> jax.Array:
  """Elementwise test that ``w`` lies exactly in ``P`` for the given ``n1``."""
  return pow2_quantize(w, bits, n1=n1) == w


def pow2_encode(q, bits: int, n1) -> jax.Array:
  """Encodes values of ``P`` as ``bits``-bit unsigned integer codes.

  The code format, read by :mod:`quant_core.deploy.codes` and the shift-matmul
  kernel::

    0                                  -> 0
    sign·2^e  (n2 <= e <= n1)          -> (sign_bit << (bits-1)) | (e - n2 + 1)

  with ``sign_bit = 1`` for negative values. The magnitude field
  ``m = code & (2^(bits-1) - 1)`` runs over ``1..2^(bits-2)``; ``m = 0`` means
  zero. The code ``2^(bits-1)`` ("negative zero") is never produced.

  Args:
    q: values already in ``P`` (e.g. from :func:`pow2_quantize` with the same
      ``n1``). Values outside ``P`` give meaningless codes: check with
      :func:`in_codebook` first where that matters.
    bits: bit width, an integer in 2..8.
    n1: int scalar, the layer's largest exponent.

  Returns:
    uint8 codes of the shape of ``q``.
  """
  return _encode_core(jnp.asarray(q), jnp.asarray(n1, jnp.int32),
                      check_bits(bits))


@functools.partial(jax.jit, static_argnums=2)
def _encode_core(q: jax.Array, n1: jax.Array, bits: int) -> jax.Array:
  n2 = n1 + 1 - num_magnitudes(bits)
  _, exponent = jnp.frexp(jnp.abs(q))
  magnitude_field = jnp.where(q != 0, exponent.astype(jnp.int32) - n2, 0)
  sign_field = jnp.where(q < 0, 1 << (bits - 1), 0)
  return (sign_field + magnitude_field).astype(jnp.uint8)


def pow2_decode(codes, bits: int, n1, dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`pow2_encode`: codes back to values of ``P``.

  Args:
    codes: unsigned integer codes in the format of :func:`pow2_encode`.
    bits: bit width, an integer in 2..8.
    n1: int scalar, the layer's largest exponent.
    dtype: floating dtype of the result.

  Returns:
    ``(-1)^sign_bit · 2^(n2 + m - 1)``, or 0 where ``m == 0``.
  """
  return _decode_core(jnp.asarray(codes), jnp.asarray(n1, jnp.int32),
                      check_bits(bits), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _decode_core(codes: jax.Array, n1: jax.Array, bits: int,
                 dtype) -> jax.Array:
  codes = codes.astype(jnp.int32)
  n2 = n1 + 1 - num_magnitudes(bits)
  magnitude_field = codes & ((1 << (bits - 1)) - 1)
  value = jnp.ldexp(jnp.ones(codes.shape, dtype), n2 + magnitude_field - 1)
  value = jnp.where(codes >> (bits - 1) == 1, -value, value)
  return jnp.where(magnitude_field == 0, jnp.zeros_like(value), value)
