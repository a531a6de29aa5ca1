"""Tests of the shift-matmul kernel (interpret mode on CPU) and packed
inference of INQ-quantized Flax models (inq_jax.pack_model)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inq_jax
from inq_jax import inq
from inq_jax import pow2_exponents
from inq_jax import pow2_quantize
from quant_core import deploy
from quant_core.deploy import codes as packed_codes
from quant_core.deploy import kernels as sm
from tests import helpers

# Ragged on every axis: M, N and K are not multiples of the blocks (8, 16)
# or of k_tile (32), and K needs padding.
M, K, N = 5, 70, 37
BLOCKS = dict(block_m=8, block_n=16)


def _packed(bits, k=K, n=N, k_tile=32, seed=0):
  w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)
  n1, _ = pow2_exponents(jnp.max(jnp.abs(w)), bits)
  q = pow2_quantize(w, bits, n1=n1)
  return packed_codes.pack(q, bits, n1, k_tile=k_tile), q


def _int8(shape, seed):
  return jax.random.randint(jax.random.key(seed), shape, -128, 128,
                            jnp.int32).astype(jnp.int8)


def _exact_product(x, q, n2):
  """``x @ q / 2^n2`` in Python integers (object arrays)."""
  units = np.vectorize(int, otypes=[object])(
      np.ldexp(np.asarray(q, np.float64), -int(n2)))
  return np.asarray(x).astype(np.int64).astype(object) @ units


def _limbs_value(result):
  """``sum_b limbs[b] · 2^(7b)`` in Python integers."""
  limbs = np.asarray(result.limbs).astype(np.int64).astype(object)
  return sum(limb * 2**(sm.BAND_EXPONENTS * b) for b, limb in enumerate(limbs))


@pytest.mark.parametrize("bits", range(2, 9))
def test_int8_activations_are_exact(bits):
  packed, q = _packed(bits, seed=bits)
  x = _int8((M, K), seed=bits)
  result = sm.shift_matmul(x, packed, **BLOCKS)
  assert result.limbs.shape == (sm.num_bands(bits), M, N)
  assert result.limbs.dtype == jnp.int32
  assert int(result.n2) == int(packed.n2)
  np.testing.assert_array_equal(_limbs_value(result),
                                _exact_product(x, q, packed.n2))
  reference = sm.shift_matmul_reference(x, packed)
  np.testing.assert_array_equal(result.limbs, reference.limbs)


@pytest.mark.parametrize("bits", range(2, 9))
def test_float32_activations_match_dense_product(bits):
  packed, q = _packed(bits, seed=10 + bits)
  # A batch axis too: x is (2, 3, K).
  x = jax.random.normal(jax.random.key(bits), (2, 3, K), jnp.float32)
  y = sm.shift_matmul(x, packed, **BLOCKS)
  assert y.shape == (2, 3, N) and y.dtype == jnp.float32
  dense = np.asarray(x, np.float64) @ np.asarray(q, np.float64)
  scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(q,
                                                                np.float64))
  # f32 accumulation of K = 70 exact products.
  assert np.all(np.abs(np.asarray(y) - dense) <= 1e-5 * scale + 1e-30)
  np.testing.assert_allclose(y, sm.shift_matmul_reference(x, packed),
                             rtol=1e-5, atol=1e-5 * float(scale.max()))


def test_bfloat16_activations_within_bf16_tolerance():
  packed, q = _packed(4, seed=3)
  x = jax.random.normal(jax.random.key(3), (M, K), jnp.bfloat16)
  y = sm.shift_matmul(x, packed, **BLOCKS)
  assert y.dtype == jnp.bfloat16
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  dense = x64 @ np.asarray(q, np.float64)
  scale = np.abs(x64) @ np.abs(np.asarray(q, np.float64))
  # Exact products, f32 accumulation, one rounding to bf16 (2^-8).
  assert np.all(np.abs(np.asarray(y, np.float64) - dense) <= 2**-8 * scale)


@pytest.mark.parametrize("bits,dtype", [(4, jnp.float32), (5, jnp.int8),
                                        (8, jnp.bfloat16)])
def test_fori_loop_kernel_matches_grid_kernel(bits, dtype):
  packed, _ = _packed(bits, seed=20 + bits)
  x = (_int8((M, K), 7) if dtype == jnp.int8 else
       jax.random.normal(jax.random.key(7), (M, K), dtype))
  grid = sm.shift_matmul(x, packed, k_loop="grid", **BLOCKS)
  fori = sm.shift_matmul(x, packed, k_loop="fori", **BLOCKS)
  for a, b in zip(jax.tree.leaves(grid), jax.tree.leaves(fori), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(b, np.float64), rtol=1e-6)


def test_to_float_rounds_the_exact_single_band_sum_once():
  packed, q = _packed(4, seed=5)
  x = _int8((M, K), seed=5)
  y = sm.to_float(sm.shift_matmul_reference(x, packed))
  exact = np.asarray(x, np.float64) @ np.asarray(q, np.float64)
  np.testing.assert_array_equal(y, exact.astype(np.float32))


def test_input_errors():
  packed, _ = _packed(4)
  with pytest.raises(ValueError, match="last axis K=70"):
    sm.shift_matmul(jnp.zeros((2, 69)), packed)
  with pytest.raises(ValueError, match="bfloat16, float32 or int8"):
    sm.shift_matmul(jnp.zeros((2, K), jnp.float16), packed)
  with pytest.raises(ValueError, match="block_m"):
    sm.shift_matmul(jnp.zeros((2, K)), packed, block_m=0)
  with pytest.raises(ValueError, match="k_loop"):
    sm.shift_matmul(jnp.zeros((2, K)), packed, k_loop="scan")
  with pytest.raises(ValueError, match="needs k_loop='fori'"):
    sm.shift_matmul(jnp.zeros((2, K)), packed, platform="gpu",
                    k_loop="grid")
  with pytest.raises(ValueError, match="PackedPow2"):
    sm.shift_matmul(jnp.zeros((2, K)), jnp.zeros((K, N)))
  big_k = sm.MAX_INT_K + 1
  big = packed_codes.PackedPow2(data=jnp.zeros((big_k + 1, 1), jnp.uint8),
                                n1=jnp.int32(0), shape=(big_k, 1), bits=5,
                                k_tile=2)
  with pytest.raises(ValueError, match="K <= 262143"):
    sm.shift_matmul(jnp.zeros((1, big_k), jnp.int8), big)


@pytest.mark.parametrize("platform,lowering,marker", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"),
    ("tpu", "tpu", "tpu_custom_call"),
])
@pytest.mark.parametrize("bits,dtype", [(4, jnp.bfloat16), (8, jnp.int8),
                                        (5, jnp.float32)])
def test_kernel_lowers_for_accelerators(platform, lowering, marker, bits,
                                        dtype):
  # Lowering to StableHLO runs the Pallas Triton / Mosaic TPU lowering
  # without the hardware; compiling the custom call needs the device.
  k, n, k_tile = 640, 300, 128 if platform == "gpu" else 512
  packed = packed_codes.PackedPow2(
      data=jax.ShapeDtypeStruct(
          (packed_codes.round_up(k, k_tile) // packed_codes.codes_per_byte(bits), n),
          jnp.uint8),
      n1=jax.ShapeDtypeStruct((), jnp.int32), shape=(k, n), bits=bits,
      k_tile=k_tile)
  x = jax.ShapeDtypeStruct((16, k), dtype)
  run = jax.jit(lambda x, p: sm.shift_matmul(x, p, platform=platform,
                                             interpret=False))
  text = run.trace(x, packed).lower(lowering_platforms=(lowering,)).as_text()
  assert marker in text


class _Net(nn.Module):
  """Conv (strided, SAME) -> Conv (VALID, no bias) -> Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 1), padding="SAME")(x))
    x = nn.Conv(5, (2, 3), padding="VALID", use_bias=False)(x)
    return nn.Dense(7)(x.reshape(x.shape[0], -1))


def _quantized_model(model, x, bits):
  variables = model.init(jax.random.key(1), x)
  quantizer = inq(bits)
  state = quantizer.init(variables["params"])
  params, state = quantizer.step(variables["params"], state, 1.0)
  return {"params": params}, state


def test_packed_model_matches_float_model():
  model = _Net()
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3), jnp.float32)
  variables, state = _quantized_model(model, x, bits=5)
  packed = inq_jax.pack_model(model, variables, state, x, k_tile=32)
  for name in ("Conv_0", "Conv_1", "Dense_0"):
    layer = packed["params"][name]["kernel"]
    assert isinstance(layer, deploy.PackedLayer)
    assert isinstance(layer.matrices, packed_codes.PackedPow2)
    assert layer.matrices.k_tile == 32
  expected = model.apply(variables, x)
  got = jax.jit(lambda v, x: deploy.packed_apply(model, v, x))(
      packed, x)
  assert got.dtype == expected.dtype
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [
    nn.Dense(6), nn.Conv(6, (3, 3), strides=(2, 1), padding="SAME")])
def test_int8_inputs_are_bit_exact(layer):
  x = _int8((2, 9, 8, 3), seed=11)
  x_float = x.astype(jnp.float32)
  variables, state = _quantized_model(layer, x_float, bits=4)
  packed = inq_jax.pack_model(layer, variables, state, x_float, k_tile=32)
  got = deploy.packed_apply(layer, packed, x)
  # Every partial sum is a multiple of 2^n2 below 2^24·2^n2 here, so the
  # float model on the same integers is exact too.
  np.testing.assert_array_equal(got, layer.apply(variables, x_float))


def test_packed_inq_model_runs_and_unpacks_to_the_quantized_model():
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (4, 10), jnp.float32)
  variables, state = _quantized_model(model, x, bits=3)
  packed = inq_jax.pack_model(model, variables, state, x)
  np.testing.assert_allclose(deploy.packed_apply(model, packed, x),
                             model.apply(variables, x), rtol=1e-5, atol=1e-6)
  helpers.assert_trees_bitwise_equal(deploy.unpack(packed), variables)


def test_jitted_packed_apply_of_an_inq_model_compiles_once_per_input_shape():
  # Shapes no other test uses, so the first call must compile.
  model = nn.Dense(5)
  xs = [jax.random.normal(jax.random.key(i), (3, 11), jnp.float32)
        for i in range(3)]
  variables, state = _quantized_model(model, xs[0], bits=4)
  packed = inq_jax.pack_model(model, variables, state, xs[0])
  with helpers.count_compilations() as first:
    jax.block_until_ready(deploy.jit_packed_apply(model)(packed, xs[0]))
  assert first[0] > 0  # The counter sees compilations at all.
  for x in xs[1:]:
    # An equal, freshly built module hits the same cache entry.
    for same_model in (model, nn.Dense(5)):
      with helpers.count_compilations() as again:
        got = deploy.jit_packed_apply(same_model)(packed, x)
        jax.block_until_ready(got)
      assert again[0] == 0
      np.testing.assert_allclose(got, model.apply(variables, x), rtol=1e-5,
                                 atol=1e-6)


def test_grouped_conv_of_an_inq_model_runs_packed():
  # Kernels packed whole could not run a grouped conv; the view's matrices can.
  layer = nn.Conv(4, (3, 3), feature_group_count=2)
  x = jax.random.normal(jax.random.key(2), (1, 5, 5, 4), jnp.float32)
  variables, state = _quantized_model(layer, x, bits=4)
  packed = inq_jax.pack_model(layer, variables, state, x)
  assert packed["params"]["kernel"].groups == 2
  np.testing.assert_allclose(deploy.packed_apply(layer, packed, x),
                             layer.apply(variables, x), rtol=1e-5, atol=1e-6)
  helpers.assert_trees_bitwise_equal(deploy.unpack(packed), variables)

