"""Tests of packed power-of-two storage (inq_jax.deploy.packing)."""

import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_deploy_exports_resolve_lazily_to_their_modules():
  assert inq_jax.deploy.pack is packing.pack
  assert inq_jax.deploy.pack_params is packing.pack_params
  assert inq_jax.deploy.PackedPow2 is packing.PackedPow2
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
