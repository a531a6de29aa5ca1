"""Tests of packed storage (quant_core.deploy.codes: power-of-two and uniform codes),
of packing an INQ model (inq_jax.pack_model) and of the size accounting."""

import dataclasses
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
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
import quant_core
from quant_core.deploy import codes as packed_codes
from quant_core.deploy import packed_layers
from quant_core.deploy import recover
from quant_core.deploy import sizes
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[3]


def _quantized(shape, bits, seed=0):
  w = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  n1, _ = pow2_exponents(jnp.max(jnp.abs(w)), bits)
  return pow2_quantize(w, bits, n1=n1), n1


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip_is_exact(bits):
  q, n1 = _quantized((3, 5, 7), bits, seed=bits)
  packed = packed_codes.pack(q, bits, n1, k_tile=6)
  # K = 15 pads to 18; nibble codes take half the rows.
  rows = 18 // 2 if bits <= 4 else 18
  assert packed.data.shape == (rows, 7)
  assert packed.data.dtype == jnp.uint8
  assert (packed.k, packed.n, packed.k_padded) == (15, 7, 18)
  np.testing.assert_array_equal(packed_codes.unpack_matrix(packed), q)
  assert packed_codes.unpack_matrix(packed, jnp.bfloat16).dtype == jnp.bfloat16


def test_nibble_layout_puts_half_tiles_in_low_and_high_nibbles():
  bits, k_tile = 4, 4
  q, n1 = _quantized((8, 3), bits)
  codes = np.asarray(jax.vmap(
      lambda row: jnp.asarray(pow2_encode(row, bits, n1)))(q))
  data = np.asarray(packed_codes.pack(q, bits, n1, k_tile=k_tile).data)
  # Tile t covers rows 4t..4t+3: byte row 2t+r = row 4t+r | row 4t+2+r << 4.
  for t in range(2):
    for r in range(2):
      np.testing.assert_array_equal(
          data[2 * t + r], codes[4 * t + r] | (codes[4 * t + 2 + r] << 4))


def test_pack_pads_with_zero_codes():
  q, n1 = _quantized((5, 4), 5)
  packed = packed_codes.pack(q, 5, n1, k_tile=8)
  np.testing.assert_array_equal(packed_codes.unpack_codes(packed)[5:], 0)


def test_pack_rejects_values_outside_the_codebook():
  q, n1 = _quantized((4, 4), 4)
  bad = q.at[1, 2].set(0.3 * q[1, 2] + 1e-3)
  with pytest.raises(ValueError, match="1 of 16 values are not in"):
    packed_codes.pack(bad, 4, n1)


@pytest.mark.parametrize("k_tile", [0, 3, -2, 2.0, True])
def test_pack_rejects_bad_k_tile(k_tile):
  q, n1 = _quantized((4, 4), 4)
  with pytest.raises(ValueError, match="k_tile"):
    packed_codes.pack(q, 4, n1, k_tile=k_tile)


def test_pack_rejects_bad_inputs():
  q, n1 = _quantized((4, 4), 4)
  with pytest.raises(ValueError, match="ndim >= 2"):
    packed_codes.pack(q[0], 4, n1)
  with pytest.raises(ValueError, match="bits"):
    packed_codes.pack(q, 9, n1)
  with pytest.raises(ValueError, match="floating"):
    packed_codes.pack(q.astype(jnp.int32), 4, n1)
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda w: packed_codes.pack(w, 4, n1).data)(q)


def test_default_k_tile_per_backend():
  assert packed_codes.default_k_tile(27, "gpu") == 32
  assert packed_codes.default_k_tile(4096, "gpu") == 128
  assert packed_codes.default_k_tile(27, "tpu") == 256
  assert packed_codes.default_k_tile(4096, "tpu") == 512
  # The power of two that pads least: 288 rows in steps of 32 (the preferred
  # 128 would pad to 384), 576 in steps of 64, 768 on TPU in steps of 256.
  assert packed_codes.default_k_tile(288, "gpu") == 32
  assert packed_codes.default_k_tile(576, "cpu") == 64
  assert packed_codes.default_k_tile(768, "tpu") == 256


class _InqNet(nn.Module):
  """A conv kernel (3, 3, 2, 4) with a bias, then a Dense kernel (8, 3) without."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
    return nn.Dense(3, use_bias=False, name="dense")(x.reshape(x.shape[0], -1))


_INQ_MODEL = _InqNet()
_INQ_X = jax.random.normal(jax.random.key(2), (2, 3, 4, 2), jnp.float32)  # conv -> 1x2x4


def _inq_variables(bits, quantizable=None):
  """The INQ-quantized variables (portion 1) of :data:`_INQ_MODEL` and their state."""
  params = _INQ_MODEL.init(jax.random.key(0), _INQ_X)["params"]
  quantizer = inq(bits, quantizable=quantizable)
  state = quantizer.init(params)
  params, state = quantizer.step(params, state, 1.0)
  return {"params": params}, state


def test_pack_model_round_trip_and_keeps_other_leaves():
  variables, state = _inq_variables(5)
  packed = inq_jax.pack_model(_INQ_MODEL, variables, state, _INQ_X)
  views = quant_core.layer_views(_INQ_MODEL, variables, _INQ_X)
  for name, perm in (("conv", None), ("dense", (0, 1))):
    layer = packed["params"][name]["kernel"]
    assert isinstance(layer, packed_layers.PackedLayer)
    assert isinstance(layer.matrices, packed_codes.PackedPow2)
    assert layer.matrices.bits == 5  # taken from the state
    assert (layer.kernel_shape, layer.kernel_perm, layer.dtype) == (
        variables["params"][name]["kernel"].shape, perm, "float32")
    # The layer's n1 from the state (not recovered from the values), one per group.
    np.testing.assert_array_equal(layer.matrices.n1, [state.n1[name]["kernel"]])
    # The packed matrix is the view's matrix: rows in the order the layer reads them.
    np.testing.assert_array_equal(
        packed_codes.unpack_matrix(layer.group(0)),
        views[name].matrices(np.asarray(variables["params"][name]["kernel"]))[0])
  bias = packed["params"]["conv"]["bias"]
  assert bias.dtype == variables["params"]["conv"]["bias"].dtype
  np.testing.assert_array_equal(bias, variables["params"]["conv"]["bias"])
  helpers.assert_trees_bitwise_equal(packed_layers.unpack(packed), variables)


def test_pack_model_packs_only_what_the_states_predicate_selects():
  only_conv = lambda path, leaf: (quant_core.default_quantizable(path, leaf)
                                  and path[0].key == "conv")
  variables, state = _inq_variables(4, quantizable=only_conv)
  # The dense kernel is still in float: packing it would raise.
  packed = inq_jax.pack_model(_INQ_MODEL, variables, state, _INQ_X, k_tile=8)
  assert isinstance(packed["params"]["conv"]["kernel"], packed_layers.PackedLayer)
  dense = packed["params"]["dense"]["kernel"]
  assert not packed_layers.is_packed_kernel(dense)
  np.testing.assert_array_equal(dense, variables["params"]["dense"]["kernel"])
  helpers.assert_trees_bitwise_equal(packed_layers.unpack(packed), variables)


def test_pack_model_names_the_bad_layer():
  variables, state = _inq_variables(4)
  variables["params"]["dense"]["kernel"] = variables["params"]["dense"]["kernel"] + 0.01
  with pytest.raises(ValueError, match=r"^dense: \d+ of 24 values are not in the 4-bit "
                     "power-of-two set"):
    inq_jax.pack_model(_INQ_MODEL, variables, state, _INQ_X)


def test_pack_model_rejects_a_mismatched_tree():
  variables, state = _inq_variables(4)
  del variables["params"]["conv"]
  with pytest.raises(ValueError, match="structure"):
    inq_jax.pack_model(_INQ_MODEL, variables, state, _INQ_X)


class _Custom(nn.Module):
  """A kernel INQ quantizes (named ``kernel``, 2-D) used by no supported layer."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))
    return x @ kernel


class _WithCustom(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Custom(name="custom")(nn.Dense(6, name="dense")(x))


def test_pack_model_keeps_a_kernel_without_a_view_in_float_and_logs_it(caplog):
  model = _WithCustom()
  x = jax.random.normal(jax.random.key(3), (4, 5), jnp.float32)
  params = model.init(jax.random.key(4), x)["params"]
  quantizer = inq(5)
  params, state = quantizer.step(params, quantizer.init(params), 1.0)
  variables = {"params": params}
  with caplog.at_level("WARNING", logger="inq_jax.packing"):
    packed = inq_jax.pack_model(model, variables, state, x)
  assert "custom/kernel: quantized by INQ but not a supported layer's kernel" in caplog.text
  assert isinstance(packed["params"]["dense"]["kernel"], packed_layers.PackedLayer)
  custom = packed["params"]["custom"]["kernel"]
  assert not packed_layers.is_packed_kernel(custom)
  np.testing.assert_array_equal(custom, params["custom"]["kernel"])
  helpers.assert_trees_bitwise_equal(packed_layers.unpack(packed), variables)


def test_size_report_counts_bytes():
  bits = 4
  variables, state = _inq_variables(bits)
  packed = inq_jax.pack_model(_INQ_MODEL, variables, state, _INQ_X, k_tile=8)
  report = sizes.size_report(packed)
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
  packed = packed_codes.pack(jnp.full((4, 4), 0.5), 3, jnp.int32(-1))
  report = sizes.size_report({"kernel": packed})
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
      packed = packed_codes.pack_uniform(codes, scale, zero_point, bits=bits,
                                         group_size=group_size, k_tile=k_tile)
      assert packed.symmetric == symmetric
      assert packed.data.shape == (packed_codes.round_up(15, k_tile) //
                                   packed_codes.codes_per_byte(bits), 7)
      np.testing.assert_array_equal(packed_codes.unpack_codes(packed)[:15],
                                    codes.reshape(15, 7))
      values = packed_codes.unpack_matrix(packed)
      assert values.shape == (3, 5, 7)
      again = packed_codes.pack_uniform_from_values(
          values, scale, zero_point, bits=bits, group_size=group_size,
          k_tile=k_tile)
      np.testing.assert_array_equal(again.data, packed.data)
      np.testing.assert_array_equal(packed_codes.unpack_matrix(again), values)
      half = packed_codes.unpack_matrix(packed, jnp.bfloat16)
      np.testing.assert_array_equal(
          packed_codes.unpack_matrix(packed_codes.pack_uniform_from_values(
              half, scale, zero_point, bits=bits, group_size=group_size,
              k_tile=k_tile), jnp.bfloat16), half)


def test_uniform_values_are_scale_times_code_minus_zero():
  codes = np.array([[0, 15], [7, 3], [9, 12]])
  scale, zero_point = np.float32([0.5, 0.25]), np.array([7, 3])
  packed = packed_codes.pack_uniform(codes, scale, zero_point, bits=4, k_tile=4)
  np.testing.assert_array_equal(packed_codes.unpack_matrix(packed),
                                [[-3.5, 3.0], [0.0, 0.0], [1.0, 2.25]])
  symmetric = packed_codes.pack_uniform(codes[:, :1], scale[:1], None, bits=4,
                                        k_tile=4)
  # Fixed zero point 2^3 - 1 = 7.
  np.testing.assert_array_equal(packed_codes.unpack_matrix(symmetric),
                                [[-3.5], [0.0], [1.0]])


def test_pack_uniform_from_values_counts_and_locates_off_grid_values():
  codes, scale, zero_point = _uniform_case(4, False, 4)
  values = packed_codes.unpack_matrix(packed_codes.pack_uniform(codes, scale, zero_point,
                                                         bits=4, group_size=4))
  bad = values.at[0, 1, 2].add(1e-3).at[2, 4, 6].add(1e-3)
  bad = bad.at[1, 0, 0].set(20.0)  # beyond the largest code
  with pytest.raises(ValueError,
                     match=r"3 of 105 values are not in the 4-bit grid.*"
                     r"\(1, 2\), \(5, 0\), \(14, 6\)\."):
    packed_codes.pack_uniform_from_values(bad, scale, zero_point, bits=4,
                                          group_size=4)


def test_pack_uniform_rejects_codes_out_of_range():
  codes, scale, zero_point = _uniform_case(3, False, None)
  codes[0, 0, 3] = 8
  with pytest.raises(ValueError, match=r"1 of 105 values are not in the "
                     r"3-bit asymmetric code range \[0, 7\].*\(0, 3\)\."):
    packed_codes.pack_uniform(codes, scale, zero_point, bits=3)
  codes = np.minimum(codes, 6)
  codes[2, 1, 0] = 7
  with pytest.raises(ValueError, match=r"1 of 105 values are not in the "
                     r"3-bit symmetric code range \[0, 6\].*\(11, 0\)\."):
    packed_codes.pack_uniform(codes, scale, None, bits=3)


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
    packed_codes.pack_uniform(**args)


@pytest.mark.parametrize("bits", [3, 6])
def test_pow2_round_trip_per_channel_and_per_group(bits):
  w = jax.random.normal(jax.random.key(bits), (15, 7), jnp.float32)
  per_channel, _ = pow2_exponents(jnp.max(jnp.abs(w), axis=0), bits)
  q = pow2_quantize(w, bits, n1=per_channel[None, :])
  packed = packed_codes.pack(q, bits, per_channel, k_tile=6)
  assert packed.n1.shape == (7,) and packed.n2.shape == (7,)
  np.testing.assert_array_equal(packed_codes.unpack_matrix(packed), q)
  # Per group of 4 rows: exponents (4, 7), ragged last group of 3.
  groups = jnp.pad(w, ((0, 1), (0, 0))).reshape(4, 4, 7)
  per_group, _ = pow2_exponents(jnp.max(jnp.abs(groups), axis=1), bits)
  n1_rows = jnp.repeat(per_group, 4, axis=0)[:15]
  q = pow2_quantize(w, bits, n1=n1_rows)
  packed = packed_codes.pack(q, bits, per_group, group_size=4, k_tile=8)
  np.testing.assert_array_equal(packed_codes.unpack_matrix(packed), q)
  with pytest.raises(ValueError, match=r"n1 must have shape \(4, 7\)"):
    packed_codes.pack(q, bits, per_channel, group_size=4, k_tile=8)
  with pytest.raises(ValueError, match=r"for their n1.*\) and \d+ more\."):
    packed_codes.pack(q, bits, per_group - 1, group_size=4, k_tile=8)


@pytest.mark.parametrize("solver", ["comq", "rtn", "gptq"])
@pytest.mark.parametrize("grid", packed_codes.LAYER_GRIDS)
@pytest.mark.parametrize("group_size", [None, 8])
def test_pack_layer_quantization_keeps_the_solver_weights(solver, grid, group_size):
  w = jax.random.normal(jax.random.key(0), (20, 6), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (48, 20), jnp.float32)
  make = {"comq": comq_jax.comq, "rtn": comq_jax.rtn, "gptq": comq_jax.gptq}[solver]
  result = make(bits=4, grid=grid, group_size=group_size,
                granularity="channel" if group_size is None else "group").quantize_layer(w, x)
  assert (result.grid, result.bits, result.group_size) == (grid, 4, group_size)
  packed = packed_codes.pack_layer_quantization(result)
  assert packed.group_size == group_size and packed.bits == 4
  np.testing.assert_array_equal(packed_codes.unpack_matrix(packed), result.weights)
  if grid != "pow2":  # The solver's own codes, re-laid.
    np.testing.assert_array_equal(packed_codes.unpack_codes(packed)[:20], result.codes)
  with pytest.raises(ValueError, match="the result's grid must be one of"):
    packed_codes.pack_layer_quantization(dataclasses.replace(result, grid="nf4"))
  same = packed_codes.pack_layer_quantization(result, grid=grid, bits=4)
  np.testing.assert_array_equal(packed_codes.unpack_matrix(same), result.weights)
  with pytest.raises(ValueError, match=r"bits=3 was passed, but the result was quantized "
                                       r"with bits=4"):
    packed_codes.pack_layer_quantization(result, bits=3)
  other = "pow2" if grid != "pow2" else "symmetric"
  with pytest.raises(ValueError, match=f"grid='{other}' was passed"):
    packed_codes.pack_layer_quantization(result, grid=other)


@pytest.mark.parametrize("solver", ["comq", "rtn"])
def test_a_layer_result_leaves_jit_whole_with_its_grid(solver):
  """The settings are static pytree metadata: a jitted solve returns the whole result,
  and it packs as the eager one does."""
  w = jax.random.normal(jax.random.key(0), (16, 6), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (40, 16), jnp.float32)
  # (GPTQ checks its damped H on the host, so it runs eagerly.)
  make = {"comq": comq_jax.comq, "rtn": comq_jax.rtn}[solver]
  solve = make(bits=3, grid="symmetric", granularity="group", group_size=8).quantize_layer
  eager = solve(w, x)
  jitted = jax.jit(lambda w, x: solve(w, x))(w, x)
  assert (jitted.bits, jitted.grid, jitted.group_size) == (3, "symmetric", 8)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(jitted))
  np.testing.assert_array_equal(
      packed_codes.unpack_matrix(packed_codes.pack_layer_quantization(jitted)),
      packed_codes.unpack_matrix(packed_codes.pack_layer_quantization(eager)))


def test_size_report_counts_uniform_bytes():
  codes, scale, zero_point = _uniform_case(4, False, 8, shape=(20, 6))
  grouped = packed_codes.pack_uniform(codes, scale, zero_point, bits=4,
                                      group_size=8, k_tile=16)
  codes, scale, _ = _uniform_case(8, True, None, shape=(10, 3))
  symmetric = packed_codes.pack_uniform(codes, scale, None, bits=8, k_tile=4)
  report = sizes.size_report({"a": grouped, "b": symmetric,
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
  report = sizes.size_report(packed_codes.pack_uniform(
      codes, scale, zero_point, bits=4, group_size=group_size))
  assert report.packed_bytes <= 1.15 * report.codebook_bytes
  assert report.packed_bytes < report.fp32_bytes / 7


def test_deploy_exports_resolve_lazily_to_their_modules():
  assert quant_core.deploy.pack is packed_codes.pack
  assert quant_core.deploy.PackedPow2 is packed_codes.PackedPow2
  assert quant_core.deploy.PackedUniform is packed_codes.PackedUniform
  assert quant_core.deploy.pack_layer_quantization is packed_codes.pack_layer_quantization
  assert quant_core.deploy.PackedLayer is packed_layers.PackedLayer
  assert quant_core.deploy.unpack is packed_layers.unpack
  assert quant_core.deploy.pack_layer_values is recover.pack_layer_values
  assert quant_core.deploy.size_report is sizes.size_report
  for name in quant_core.deploy.__all__:
    getattr(quant_core.deploy, name)
  with pytest.raises(AttributeError, match="no_such_name"):
    _ = quant_core.deploy.no_such_name
  # Whole-kernel INQ packing is gone: INQ packs with inq_jax.pack_model.
  for removed in ("pack_params", "unpack_params", "pack_variables", "evaluate_packed"):
    assert removed not in quant_core.deploy.__all__
    with pytest.raises(AttributeError, match=removed):
      getattr(quant_core.deploy, removed)
  # Not re-exported at the top level any more.
  assert not hasattr(inq_jax, "pack")
  assert not hasattr(inq_jax, "deploy")


@pytest.mark.integration
def test_importing_the_libraries_does_not_load_the_kernel():
  # A fresh interpreter: this one has imported the kernel already.
  # The packed representation, the recovery of codes and the size accounting hold no
  # Pallas code (inq_jax packs with them, comq_jax reuses the SizeReport).
  code = ("import sys, inq_jax, comq_jax, quant_core, quant_core.deploy.codes, "
          "quant_core.deploy.packed_layers, quant_core.deploy.recover, "
          "quant_core.deploy.sizes; "
          "print(sorted(m for m in sys.modules "
          "if m == 'jax.experimental.pallas' or m.startswith('quant_core.deploy.') and "
          "m.split('.')[-1] not in ('codes', 'packed_layers', 'recover', 'sizes')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=REPO)
  assert out.stdout.strip() == "[]", out.stdout
