"""Tests of packed power-of-two storage (inq_jax.deploy.packing)."""

import dataclasses
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import inq_jax
from inq_jax import inq
from inq_jax import pow2_encode
from inq_jax import pow2_exponents
from inq_jax import pow2_quantize
from inq_jax.deploy import packing

REPO = pathlib.Path(__file__).resolve().parents[1]


def _quantized(shape, bits, seed=0):
  w = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  n1, _ = pow2_exponents(jnp.max(jnp.abs(w)), bits)
  return pow2_quantize(w, bits, n1=n1), n1


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip_is_exact(bits):
  q, n1 = _quantized((3, 5, 7), bits, seed=bits)
  packed = packing.pack(q, bits, n1, k_tile=6)
  # K = 15 pads to 18; nibble codes take half the rows.
  rows = 18 // 2 if bits <= 4 else 18
  assert packed.data.shape == (rows, 7)
  assert packed.data.dtype == jnp.uint8
  assert (packed.k, packed.n, packed.k_padded) == (15, 7, 18)
  np.testing.assert_array_equal(packing.unpack(packed), q)
  assert packing.unpack(packed, jnp.bfloat16).dtype == jnp.bfloat16


def test_nibble_layout_puts_half_tiles_in_low_and_high_nibbles():
  bits, k_tile = 4, 4
  q, n1 = _quantized((8, 3), bits)
  codes = np.asarray(jax.vmap(
      lambda row: jnp.asarray(pow2_encode(row, bits, n1)))(q))
  data = np.asarray(packing.pack(q, bits, n1, k_tile=k_tile).data)
  # Tile t covers rows 4t..4t+3: byte row 2t+r = row 4t+r | row 4t+2+r << 4.
  for t in range(2):
    for r in range(2):
      np.testing.assert_array_equal(
          data[2 * t + r], codes[4 * t + r] | (codes[4 * t + 2 + r] << 4))


def test_pack_pads_with_zero_codes():
  q, n1 = _quantized((5, 4), 5)
  packed = packing.pack(q, 5, n1, k_tile=8)
  np.testing.assert_array_equal(packing.unpack_codes(packed)[5:], 0)


def test_pack_rejects_values_outside_the_codebook():
  q, n1 = _quantized((4, 4), 4)
  bad = q.at[1, 2].set(0.3 * q[1, 2] + 1e-3)
  with pytest.raises(ValueError, match="1 of 16 values are not in"):
    packing.pack(bad, 4, n1)


@pytest.mark.parametrize("k_tile", [0, 3, -2, 2.0, True])
def test_pack_rejects_bad_k_tile(k_tile):
  q, n1 = _quantized((4, 4), 4)
  with pytest.raises(ValueError, match="k_tile"):
    packing.pack(q, 4, n1, k_tile=k_tile)


def test_pack_rejects_bad_inputs():
  q, n1 = _quantized((4, 4), 4)
  with pytest.raises(ValueError, match="ndim >= 2"):
    packing.pack(q[0], 4, n1)
  with pytest.raises(ValueError, match="bits"):
    packing.pack(q, 9, n1)
  with pytest.raises(ValueError, match="floating"):
    packing.pack(q.astype(jnp.int32), 4, n1)
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda w: packing.pack(w, 4, n1).data)(q)


def test_default_k_tile_per_backend():
  assert packing.default_k_tile(27, "gpu") == 32
  assert packing.default_k_tile(4096, "gpu") == 128
  assert packing.default_k_tile(27, "tpu") == 256
  assert packing.default_k_tile(4096, "tpu") == 512
  # The power of two that pads least: 288 rows in steps of 32 (the preferred
  # 128 would pad to 384), 576 in steps of 64, 768 on TPU in steps of 256.
  assert packing.default_k_tile(288, "gpu") == 32
  assert packing.default_k_tile(576, "cpu") == 64
  assert packing.default_k_tile(768, "tpu") == 256


def _inq_params(bits, quantizable=None):
  params = {
      "conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)),
               "bias": jnp.zeros(4)},
      "dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 3))},
  }
  quantizer = inq(bits, quantizable=quantizable)
  state = quantizer.init(params)
  params, state = quantizer.step(params, state, 1.0)
  return params, state


def test_pack_params_round_trip_and_keeps_other_leaves():
  params, state = _inq_params(5)
  packed = packing.pack_params(params, state)
  assert isinstance(packed["conv"]["kernel"], packing.PackedPow2)
  assert packed["conv"]["kernel"].bits == 5  # taken from the state
  assert packed["conv"]["bias"] is params["conv"]["bias"]
  restored = packing.unpack_params(packed)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_pack_params_packs_only_what_the_states_predicate_selects():
  only_conv = lambda path, leaf: (inq_jax.default_quantizable(path, leaf)
                                  and path[0].key == "conv")
  params, state = _inq_params(4, quantizable=only_conv)
  # The dense kernel is still in float: packing it would raise.
  packed = packing.pack_params(params, state, k_tile=8)
  assert isinstance(packed["conv"]["kernel"], packing.PackedPow2)
  assert packed["dense"]["kernel"] is params["dense"]["kernel"]


def test_pack_params_names_the_bad_leaf():
  params, state = _inq_params(4)
  params["dense"]["kernel"] = params["dense"]["kernel"] + 0.01
  with pytest.raises(ValueError, match="dense/kernel"):
    packing.pack_params(params, state)


def test_pack_params_rejects_a_mismatched_tree():
  params, state = _inq_params(4)
  del params["conv"]
  with pytest.raises(ValueError, match="structure"):
    packing.pack_params(params, state)


def test_size_report_counts_bytes():
  bits = 4
  params, state = _inq_params(bits)
  packed = packing.pack_params(params, state, k_tile=8)
  report = packing.size_report(packed)
  weights = 3 * 3 * 2 * 4 + 8 * 3
  assert report.fp32_bytes == 4 * (weights + 4)
  # conv K=18 pads to 24 -> 12 byte rows x 4; dense K=8 -> 4 x 3; n1 4 bytes
  # per layer; the f32 bias 16 bytes.
  assert report.packed_bytes == 12 * 4 + 4 * 3 + 2 * 4 + 16
  codebook = weights * math.log2(2**(bits - 1) + 1) / 8 + 2 * 4 + 16
  assert report.codebook_bytes == pytest.approx(codebook)
  assert 2 * 4 + 16 <= report.entropy_bytes <= report.codebook_bytes
  assert report.quantized_fraction == pytest.approx(weights / (weights + 4))


def test_size_report_entropy_of_a_constant_layer_is_zero():
  packed = packing.pack(jnp.full((4, 4), 0.5), 3, jnp.int32(-1))
  report = packing.size_report({"kernel": packed})
  assert report.entropy_bytes == pytest.approx(4)  # only n1


def _uniform_case(bits, symmetric, group_size, shape=(3, 5, 7), seed=0):
  """Random codes and parameters of a uniform grid, matrix view (15, 7)."""
  rng = np.random.default_rng(seed)
  k, n = math.prod(shape[:-1]), shape[-1]
  param_shape = (n,) if group_size is None else (-(-k // group_size), n)
  top = 2**bits - 1 if symmetric else 2**bits
  codes = rng.integers(0, top, shape)
  scale = rng.uniform(0.01, 0.1, param_shape).astype(np.float32)
  zero_point = None if symmetric else rng.integers(0, 2**bits, param_shape)
  return codes, scale, zero_point


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_round_trip_is_exact(bits):
  for symmetric in (False, True):
    for group_size, k_tile in ((None, 6), (4, 8)):
      codes, scale, zero_point = _uniform_case(bits, symmetric, group_size,
                                               seed=bits)
      packed = packing.pack_uniform(codes, scale, zero_point, bits=bits,
                                    group_size=group_size, k_tile=k_tile)
      assert packed.symmetric == symmetric
      assert packed.data.shape == (packing.round_up(15, k_tile) //
                                   packing.codes_per_byte(bits), 7)
      np.testing.assert_array_equal(packing.unpack_codes(packed)[:15],
                                    codes.reshape(15, 7))
      values = packing.unpack(packed)
      assert values.shape == (3, 5, 7)
      again = packing.pack_uniform_from_values(
          values, scale, zero_point, bits=bits, group_size=group_size,
          k_tile=k_tile)
      np.testing.assert_array_equal(again.data, packed.data)
      np.testing.assert_array_equal(packing.unpack(again), values)
      half = packing.unpack(packed, jnp.bfloat16)
      np.testing.assert_array_equal(
          packing.unpack(packing.pack_uniform_from_values(
              half, scale, zero_point, bits=bits, group_size=group_size,
              k_tile=k_tile), jnp.bfloat16), half)


def test_uniform_values_are_scale_times_code_minus_zero():
  codes = np.array([[0, 15], [7, 3], [9, 12]])
  scale, zero_point = np.float32([0.5, 0.25]), np.array([7, 3])
  packed = packing.pack_uniform(codes, scale, zero_point, bits=4, k_tile=4)
  np.testing.assert_array_equal(packing.unpack(packed),
                                [[-3.5, 3.0], [0.0, 0.0], [1.0, 2.25]])
  symmetric = packing.pack_uniform(codes[:, :1], scale[:1], None, bits=4,
                                   k_tile=4)
  # Fixed zero point 2^3 - 1 = 7.
  np.testing.assert_array_equal(packing.unpack(symmetric),
                                [[-3.5], [0.0], [1.0]])


def test_pack_uniform_from_values_counts_and_locates_off_grid_values():
  codes, scale, zero_point = _uniform_case(4, False, 4)
  values = packing.unpack(packing.pack_uniform(codes, scale, zero_point,
                                               bits=4, group_size=4))
  bad = values.at[0, 1, 2].add(1e-3).at[2, 4, 6].add(1e-3)
  bad = bad.at[1, 0, 0].set(20.0)  # beyond the largest code
  with pytest.raises(ValueError,
                     match=r"3 of 105 values are not in the 4-bit grid.*"
                     r"\(1, 2\), \(5, 0\), \(14, 6\)\."):
    packing.pack_uniform_from_values(bad, scale, zero_point, bits=4,
                                     group_size=4)


def test_pack_uniform_rejects_codes_out_of_range():
  codes, scale, zero_point = _uniform_case(3, False, None)
  codes[0, 0, 3] = 8
  with pytest.raises(ValueError, match=r"1 of 105 values are not in the "
                     r"3-bit asymmetric code range \[0, 7\].*\(0, 3\)\."):
    packing.pack_uniform(codes, scale, zero_point, bits=3)
  codes = np.minimum(codes, 6)
  codes[2, 1, 0] = 7
  with pytest.raises(ValueError, match=r"1 of 105 values are not in the "
                     r"3-bit symmetric code range \[0, 6\].*\(11, 0\)\."):
    packing.pack_uniform(codes, scale, None, bits=3)


@pytest.mark.parametrize("change,message", [
    (dict(scale=np.ones((6,), np.float32)), r"scale must have shape \(7,\)"),
    (dict(scale=np.full((7,), -1.0, np.float32)), "finite and > 0; 7 of 7"),
    (dict(scale=np.ones((7,), np.int32)), "floating"),
    (dict(zero_point=np.full((7,), 257)), r"zero_point must lie in \[-241, 256\]"),
    (dict(zero_point=np.full((7,), 0.0)), "integer"),
    (dict(codes=np.zeros((3, 5, 7), np.float32)), "codes must be an integer"),
    (dict(group_size=0), "group_size must be None"),
    (dict(group_size=4, scale=np.ones((4, 7), np.float32),
          zero_point=np.zeros((4, 7), np.int32), k_tile=6),
     "multiple of group_size=4"),
    (dict(group_size=2, scale=np.ones((8, 7), np.float32),
          zero_point=np.zeros((8, 7), np.int32), k_tile=6),
     "k_tile / group_size must be 1 or even"),
    (dict(k_tile=5), "even int"),
])
def test_pack_uniform_rejects_bad_arguments(change, message):
  codes, scale, zero_point = _uniform_case(4, False, None)
  args = dict(codes=codes, scale=scale, zero_point=zero_point, bits=4)
  args.update(change)
  with pytest.raises(ValueError, match=message):
    packing.pack_uniform(**args)


@pytest.mark.parametrize("bits", [3, 6])
def test_pow2_round_trip_per_channel_and_per_group(bits):
  w = jax.random.normal(jax.random.key(bits), (15, 7), jnp.float32)
  per_channel, _ = pow2_exponents(jnp.max(jnp.abs(w), axis=0), bits)
  q = pow2_quantize(w, bits, n1=per_channel[None, :])
  packed = packing.pack(q, bits, per_channel, k_tile=6)
  assert packed.n1.shape == (7,) and packed.n2.shape == (7,)
  np.testing.assert_array_equal(packing.unpack(packed), q)
  # Per group of 4 rows: exponents (4, 7), ragged last group of 3.
  groups = jnp.pad(w, ((0, 1), (0, 0))).reshape(4, 4, 7)
  per_group, _ = pow2_exponents(jnp.max(jnp.abs(groups), axis=1), bits)
  n1_rows = jnp.repeat(per_group, 4, axis=0)[:15]
  q = pow2_quantize(w, bits, n1=n1_rows)
  packed = packing.pack(q, bits, per_group, group_size=4, k_tile=8)
  np.testing.assert_array_equal(packing.unpack(packed), q)
  with pytest.raises(ValueError, match=r"n1 must have shape \(4, 7\)"):
    packing.pack(q, bits, per_channel, group_size=4, k_tile=8)
  with pytest.raises(ValueError, match=r"for their n1.*\) and \d+ more\."):
    packing.pack(q, bits, per_group - 1, group_size=4, k_tile=8)


@pytest.mark.parametrize("solver", ["comq", "rtn", "gptq"])
@pytest.mark.parametrize("grid", packing.LAYER_GRIDS)
@pytest.mark.parametrize("group_size", [None, 8])
def test_pack_layer_quantization_keeps_the_solver_weights(solver, grid, group_size):
  w = jax.random.normal(jax.random.key(0), (20, 6), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (48, 20), jnp.float32)
  solve = {"comq": comq_jax.quantize_layer, "rtn": comq_jax.round_to_nearest,
           "gptq": comq_jax.gptq_layer}[solver]
  result = solve(w, x, bits=4, grid=grid, group_size=group_size,
                 granularity="channel" if group_size is None else "group")
  assert (result.grid, result.bits, result.group_size) == (grid, 4, group_size)
  packed = packing.pack_layer_quantization(result)
  assert packed.group_size == group_size and packed.bits == 4
  np.testing.assert_array_equal(packing.unpack(packed), result.weights)
  with pytest.raises(ValueError, match="the result's grid must be one of"):
    packing.pack_layer_quantization(dataclasses.replace(result, grid="nf4"))
  same = packing.pack_layer_quantization(result, grid=grid, bits=4)
  np.testing.assert_array_equal(packing.unpack(same), result.weights)
  with pytest.raises(ValueError, match=r"bits=3 was passed, but the result was quantized "
                                       r"with bits=4"):
    packing.pack_layer_quantization(result, bits=3)
  other = "pow2" if grid != "pow2" else "symmetric"
  with pytest.raises(ValueError, match=f"grid='{other}' was passed"):
    packing.pack_layer_quantization(result, grid=other)


@pytest.mark.parametrize("solver", ["comq", "rtn"])
def test_a_layer_result_leaves_jit_whole_with_its_grid(solver):
  """The settings are static pytree metadata: a jitted solve returns the whole result,
  and it packs as the eager one does."""
  w = jax.random.normal(jax.random.key(0), (16, 6), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (40, 16), jnp.float32)
  # (gptq_layer checks its damped H on the host, so it runs eagerly.)
  solve = {"comq": comq_jax.quantize_layer, "rtn": comq_jax.round_to_nearest}[solver]
  options = dict(bits=3, grid="symmetric", granularity="group", group_size=8)
  eager = solve(w, x, **options)
  jitted = jax.jit(lambda w, x: solve(w, x, **options))(w, x)
  assert (jitted.bits, jitted.grid, jitted.group_size) == (3, "symmetric", 8)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(jitted))
  np.testing.assert_array_equal(packing.unpack(packing.pack_layer_quantization(jitted)),
                                packing.unpack(packing.pack_layer_quantization(eager)))


def test_size_report_counts_uniform_bytes():
  codes, scale, zero_point = _uniform_case(4, False, 8, shape=(20, 6))
  grouped = packing.pack_uniform(codes, scale, zero_point, bits=4,
                                 group_size=8, k_tile=16)
  codes, scale, _ = _uniform_case(8, True, None, shape=(10, 3))
  symmetric = packing.pack_uniform(codes, scale, None, bits=8, k_tile=4)
  report = packing.size_report({"a": grouped, "b": symmetric,
                                "bias": jnp.zeros(3, jnp.bfloat16)})
  assert report.fp32_bytes == 4 * (120 + 30 + 3)
  # a: K = 20 pads to 32 -> 16 byte rows x 6; 3 groups x 6 float32 scales
  # and int32 zero points. b: 12 rows x 3 codes; 3 float32 scales. bias: 2
  # bytes a value.
  a_params, b_params = 3 * 6 * 4 * 2, 3 * 4
  assert report.packed_bytes == 16 * 6 + a_params + 12 * 3 + b_params + 6
  codebook = (120 * 4 / 8 + a_params + 30 * math.log2(255) / 8 + b_params
              + 6)
  assert report.codebook_bytes == pytest.approx(codebook)
  assert a_params + b_params + 6 <= report.entropy_bytes <= codebook
  assert report.quantized_fraction == pytest.approx(150 / 153)


@pytest.mark.parametrize("group_size", [None, 128])
def test_packed_4_bit_size_is_near_the_information_theoretic_size(group_size):
  codes, scale, zero_point = _uniform_case(4, False, group_size,
                                           shape=(512, 512))
  report = packing.size_report(packing.pack_uniform(
      codes, scale, zero_point, bits=4, group_size=group_size))
  assert report.packed_bytes <= 1.15 * report.codebook_bytes
  assert report.packed_bytes < report.fp32_bytes / 7


def test_deploy_exports_resolve_lazily_to_their_modules():
  assert inq_jax.deploy.pack is packing.pack
  assert inq_jax.deploy.pack_params is packing.pack_params
  assert inq_jax.deploy.PackedPow2 is packing.PackedPow2
  assert inq_jax.deploy.PackedUniform is packing.PackedUniform
  for name in inq_jax.deploy.__all__:
    getattr(inq_jax.deploy, name)
  with pytest.raises(AttributeError, match="no_such_name"):
    _ = inq_jax.deploy.no_such_name
  # Not re-exported at the top level any more.
  assert not hasattr(inq_jax, "pack")


def test_importing_the_libraries_does_not_load_the_kernel():
  # A fresh interpreter: this one has imported the kernel already.
  # Packing holds no Pallas code (comq_jax reuses its SizeReport).
  code = ("import sys, inq_jax, comq_jax; "
          "print(sorted(m for m in sys.modules "
          "if m == 'jax.experimental.pallas' or "
          "m.startswith('inq_jax.deploy.') and m != 'inq_jax.deploy.packing'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=REPO)
  assert out.stdout.strip() == "[]", out.stdout
