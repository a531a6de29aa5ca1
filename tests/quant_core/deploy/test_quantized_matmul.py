"""Tests of the quantized-matmul kernel family (interpret mode on CPU) against
its jnp reference and an independent numpy computation of the de-quantized
product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant_core.deploy import codes as packed_codes
from quant_core.deploy import kernels as qm

M = 3
BLOCKS = dict(block_m=8, block_n=16)  # N = 37 is ragged for block_n
# (grid, granularity): pow2 exponents per layer, per channel or per group.
KINDS = [("asymmetric", "channel"), ("asymmetric", "group"),
         ("symmetric", "channel"), ("symmetric", "group"),
         ("pow2", "layer"), ("pow2", "channel"), ("pow2", "group")]
# K = 72 pads to 96: three K steps of 32; groups of 16 leave a short last
# group (8 rows) and a group of padding rows.
K, N, GROUP_SIZE, K_TILE = 72, 37, 16, 32


def random_packed(grid, granularity, bits, *, k=K, n=N, group_size=GROUP_SIZE,
                   k_tile=K_TILE, seed=0):
  """A packed weight with random codes and parameters over their full range."""
  rng = np.random.default_rng(seed)
  group_size = group_size if granularity == "group" else None
  param_shape = {"layer": (), "channel": (n,),
                 "group": (-(-k // (group_size or 1)), n)}[granularity]
  if grid == "pow2":
    n1 = rng.integers(-4, 2, param_shape).astype(np.int32)
    n2 = _per_row(n1, k, n, group_size) + 1 - 2**(bits - 2)
    magnitude = rng.integers(0, 2**(bits - 2) + 1, (k, n))
    sign = rng.choice([-1.0, 1.0], (k, n))
    w = np.where(magnitude == 0, 0.0,
                 sign * np.ldexp(1.0, n2 + magnitude - 1))
    return packed_codes.pack(w.astype(np.float32), bits, n1, k_tile=k_tile,
                             group_size=group_size)
  scale = rng.uniform(0.01, 0.1, param_shape).astype(np.float32)
  if grid == "symmetric":
    codes, zero_point = rng.integers(0, 2**bits - 1, (k, n)), None
  else:
    codes = rng.integers(0, 2**bits, (k, n))
    # The whole allowed range, extremes included.
    zero_point = rng.integers(2**bits - 1 - packed_codes.MAX_LEVEL_MAGNITUDE,
                              packed_codes.MAX_LEVEL_MAGNITUDE + 1, param_shape)
  return packed_codes.pack_uniform(codes, scale, zero_point, bits=bits,
                                   group_size=group_size, k_tile=k_tile)


def _activations(dtype, shape, seed):
  if dtype == jnp.int8:
    return jax.random.randint(jax.random.key(seed), shape, -128, 128,
                              jnp.int32).astype(jnp.int8)
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _per_row(param, k, n, group_size):
  """A ``()``, ``(N,)`` or ``(groups, N)`` parameter as ``(K, N)``."""
  param = np.asarray(param)
  if group_size is not None:
    return np.repeat(param, group_size, axis=0)[:k]
  return np.broadcast_to(param, (k, n))


def _integer_levels(packed):
  """Integer levels ``l_b`` per band, from the de-quantized weights:
  ``W = step · sum_b l_b · 2^(7b)`` with step ``scale`` or ``2^n2``."""
  k, n = packed.k, packed.n
  w = np.asarray(packed_codes.unpack_matrix(packed), np.float64).reshape(k, n)
  if isinstance(packed, packed_codes.PackedUniform):
    scale = _per_row(packed.scale, k, n, packed.group_size)
    return [np.round(w / scale).astype(np.int64)]
  # |w| = 2^(n2 + j) exactly, j in 0..2^(bits-2)-1.
  j = np.frexp(np.abs(w))[1] - 1 - _per_row(packed.n2, k, n,
                                              packed.group_size)
  return [np.where((w != 0) & (j // qm.BAND_EXPONENTS == b), np.sign(w) *
                   np.ldexp(1.0, j - qm.BAND_EXPONENTS * b), 0.0
                   ).astype(np.int64)
          for b in range(qm.num_bands(packed.bits))]


def _sequential_sum(terms):
  total = terms[0]
  for term in terms[1:]:
    total = total + term
  return total


def _int8_contract(x, packed):
  """The int8 result from exact integer products of the de-quantized weights,
  rounded as the kernels' module docstring says."""
  x = np.asarray(x, np.int64)
  levels = _integer_levels(packed)
  is_pow2 = isinstance(packed, packed_codes.PackedPow2)
  if packed.group_size is None:
    sums = [(x @ level).astype(np.float32) for level in levels]
    if not is_pow2:
      return sums[0] * np.asarray(packed.scale)
    n2 = np.broadcast_to(np.asarray(packed.n2), (packed.n,))
    return _sequential_sum([np.ldexp(s, n2 + qm.BAND_EXPONENTS * b)
                            for b, s in enumerate(sums)])
  group_scale = (np.ldexp(np.float32(1), np.asarray(packed.n2)) if is_pow2
                 else np.asarray(packed.scale))
  acc = np.zeros((x.shape[0], packed.n), np.float32)
  for g in range(packed.num_groups):
    rows = slice(g * packed.group_size, (g + 1) * packed.group_size)
    for b, level in enumerate(levels):
      partial = (x[:, rows] @ level[rows]).astype(np.float32)
      acc = acc + partial * (group_scale[g] *
                             np.float32(2**(qm.BAND_EXPONENTS * b)))
  return acc


def _check_float(y, x, packed):
  """Float result against the f64 product with the de-quantized weights."""
  assert y.dtype == x.dtype
  x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, packed.k)
  w = np.asarray(packed_codes.unpack_matrix(packed), np.float64).reshape(packed.k, packed.n)
  dense, magnitude = x64 @ w, np.abs(x64) @ np.abs(w)
  # Exact products; f32 accumulation of K terms (1e-6 ~ 17 ulp), or a final
  # rounding to bf16 (2^-8 relative to the magnitude bounds it).
  tolerance = 1e-6 if x.dtype == jnp.float32 else 2**-8
  error = np.abs(np.asarray(y, np.float64).reshape(dense.shape) - dense)
  assert np.all(error <= tolerance * magnitude), float(
      np.max(error / magnitude))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("grid,granularity", KINDS)
def test_int8_activations_are_exact(grid, granularity, bits):
  # Odd widths: groups as large as the K step (both nibble halves of a step
  # are one group); even widths: two groups a step.
  group_size = K_TILE if bits % 2 else GROUP_SIZE
  packed = random_packed(grid, granularity, bits, group_size=group_size,
                          seed=bits)
  x = _activations(jnp.int8, (M, K), seed=bits)
  y = qm.quantized_matmul(x, packed, **BLOCKS)
  assert y.shape == (M, N) and y.dtype == jnp.float32
  np.testing.assert_array_equal(y, qm.quantized_matmul_reference(x, packed))
  np.testing.assert_array_equal(y, _int8_contract(x, packed))


# Every kind at every width; the float dtype alternates with the width, so
# every kind runs in both.
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)
FLOAT_CASES = [(grid, granularity, bits, FLOAT_DTYPES[bits % 2])
               for grid, granularity in KINDS for bits in range(2, 9)]


@pytest.mark.parametrize("grid,granularity,bits,dtype", FLOAT_CASES)
def test_float_activations_match_dense_product(grid, granularity, bits, dtype):
  packed = random_packed(grid, granularity, bits, seed=10 + bits)
  x = _activations(dtype, (2, M, K), seed=bits)  # batch axes (2, M)
  y = qm.quantized_matmul(x, packed, **BLOCKS)
  assert y.shape == (2, M, N)
  _check_float(y, x, packed)
  _check_float(qm.quantized_matmul_reference(x, packed), x, packed)


@pytest.mark.parametrize("grid,granularity,bits,dtype", [
    ("asymmetric", "group", 4, jnp.int8),
    ("pow2", "channel", 6, jnp.bfloat16)])
def test_fori_loop_form_matches_grid_form(grid, granularity, bits, dtype):
  packed = random_packed(grid, granularity, bits, seed=20 + bits)
  x = _activations(dtype, (M, K), seed=7)
  grid_form = qm.quantized_matmul(x, packed, k_loop="grid", **BLOCKS)
  fori_form = qm.quantized_matmul(x, packed, k_loop="fori", **BLOCKS)
  # The same steps in the same order.
  np.testing.assert_array_equal(grid_form, fori_form)


def test_shift_matmul_is_the_exact_pow2_case():
  packed = random_packed("pow2", "channel", 8, seed=5)
  x = _activations(jnp.int8, (M, K), seed=5)
  result = qm.shift_matmul(x, packed, **BLOCKS)
  assert result.limbs.shape == (qm.num_bands(8), M, N)
  np.testing.assert_array_equal(result.n2, packed.n2)
  np.testing.assert_array_equal(qm.to_float(result),
                                qm.quantized_matmul(x, packed, **BLOCKS))


def test_input_errors():
  packed = random_packed("asymmetric", "channel", 4)
  with pytest.raises(ValueError, match="last axis K=72"):
    qm.quantized_matmul(jnp.zeros((2, 71)), packed)
  with pytest.raises(ValueError, match="bfloat16, float32 or int8"):
    qm.quantized_matmul(jnp.zeros((2, K), jnp.float16), packed)
  with pytest.raises(ValueError, match="PackedPow2 or PackedUniform"):
    qm.quantized_matmul(jnp.zeros((2, K)), jnp.zeros((K, N)))
  with pytest.raises(ValueError, match="k_loop"):
    qm.quantized_matmul(jnp.zeros((2, K)), packed, k_loop="scan")
  with pytest.raises(ValueError, match="must be a PackedPow2"):
    qm.shift_matmul(jnp.zeros((2, K)), packed)
  grouped = random_packed("pow2", "group", 4)
  with pytest.raises(ValueError, match="group-wise exponents"):
    qm.shift_matmul(jnp.zeros((2, K), jnp.int8), grouped)
  big_k = qm.MAX_UNIFORM_INT_K + 1
  big = packed_codes.PackedUniform(
      data=jnp.zeros((1, 1), jnp.uint8), scale=jnp.ones((1,)),
      zero_point=None, shape=(big_k, 1), bits=8, k_tile=2)
  with pytest.raises(ValueError, match=f"K <= {qm.MAX_UNIFORM_INT_K}"):
    qm.quantized_matmul(jnp.zeros((1, big_k), jnp.int8), big)


def _abstract(packed):
  """``packed`` with every array replaced by its shape and dtype."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                      packed)


@pytest.mark.parametrize("platform,lowering,marker", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"),
    ("tpu", "tpu", "tpu_custom_call"),
])
@pytest.mark.parametrize("grid,granularity,bits,dtype", [
    ("asymmetric", "group", 4, jnp.bfloat16),   # int4 g128, tile scales
    ("asymmetric", "channel", 4, jnp.int8),     # zero-point correction
    ("pow2", "channel", 8, jnp.int8),           # ten exponent bands
])
def test_kernel_lowers_for_accelerators(platform, lowering, marker, grid,
                                        granularity, bits, dtype):
  # Lowering to StableHLO runs the Pallas Triton / Mosaic TPU lowering
  # without the hardware; compiling the custom call needs the device.
  k, n = 640, 300
  k_tile = 128 if platform == "gpu" else 512
  packed = _abstract(random_packed(grid, granularity, bits, k=k, n=n,
                                    group_size=128, k_tile=k_tile))
  x = jax.ShapeDtypeStruct((16, k), dtype)
  run = jax.jit(lambda x, p: qm.quantized_matmul(x, p, platform=platform,
                                                 interpret=False))
  text = run.trace(x, packed).lower(lowering_platforms=(lowering,)).as_text()
  assert marker in text
