"""The Hopper (Mosaic GPU) W4A16 kernel: lowered for sm_90 on this host, run in the
Mosaic GPU interpreter against the jnp reference, its scope and its selection.

The compiled kernel runs only on an sm_90 GPU (``tests/quant_core/deploy/test_gpu_kernels.py``,
marker ``gpu``, through ``benchmarks/gpu_check.py``).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant_core.deploy import hopper
from quant_core.deploy import kernels
from tests.quant_core.deploy.test_quantized_matmul import random_packed


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _assert_bf16_close(got, expected):
  """Within bfloat16 rounding of the output (2^-8 relative) plus f32 order."""
  got = np.asarray(got, np.float32)
  expected = np.asarray(expected, np.float32)
  bound = 2.0**-8 * np.abs(expected) + 1e-5 * np.max(np.abs(expected))
  excess = np.abs(got - expected) - bound
  assert np.all(excess <= 0), f"max excess over the bound {excess.max()}"


@pytest.mark.parametrize("grid, granularity, bits, group_size, k_tile", [
    ("asymmetric", "group", 4, 128, 128),    # int4 g128, the GPU default k_tile
    ("symmetric", "channel", 4, None, 128),
    ("asymmetric", "group", 8, 128, 128),    # one code per byte
])
def test_kernel_lowers_for_sm90(grid, granularity, bits, group_size, k_tile):
  # Lowering runs the Mosaic GPU pipeline (layout inference, the dialect down to
  # LLVM/NVVM) without the hardware; only the final PTX compile needs a GPU.
  packed = random_packed(grid, granularity, bits, k=512, n=256,
                         group_size=group_size, k_tile=k_tile)
  x = jax.ShapeDtypeStruct((16, 512), jnp.bfloat16)
  text = jax.jit(hopper.hopper_quantized_matmul).trace(
      x, _abstract(packed)).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert "triton" not in text


@pytest.mark.parametrize("grid, granularity, bits, group_size, k_tile, m, k, n", [
    ("asymmetric", "group", 4, 128, 128, 5, 320, 128),     # K padded, one M block
    ("symmetric", "channel", 4, None, 128, 70, 256, 192),  # two M blocks, three N
    ("asymmetric", "group", 2, 64, 128, 3, 256, 64),       # a group per nibble half
    ("symmetric", "group", 3, 128, 256, 3, 512, 64),
    ("asymmetric", "group", 8, 128, 128, 1, 256, 64),
    ("asymmetric", "channel", 5, None, 64, 2, 200, 64),
])
def test_interpreted_kernel_matches_the_reference(grid, granularity, bits, group_size,
                                                  k_tile, m, k, n):
  packed = random_packed(grid, granularity, bits, k=k, n=n, group_size=group_size,
                         k_tile=k_tile, seed=bits)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
  got = hopper.hopper_quantized_matmul(x, packed, interpret=True)
  assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
  # The reference in f32 (bf16 inputs are exact there): the kernel's only extra
  # rounding is the bf16 output.
  _assert_bf16_close(got, kernels.quantized_matmul_reference(
      x.astype(jnp.float32), packed))


def test_leading_batch_axes_are_kept():
  packed = random_packed("asymmetric", "group", 4, k=128, n=64, group_size=128,
                         k_tile=128)
  x = jax.random.normal(jax.random.key(0), (2, 3, 128), jnp.bfloat16)
  got = hopper.hopper_quantized_matmul(x, packed, interpret=True)
  assert got.shape == (2, 3, 64)
  flat = hopper.hopper_quantized_matmul(x.reshape(6, 128), packed, interpret=True)
  np.testing.assert_array_equal(np.asarray(got).reshape(6, 64), np.asarray(flat))


@pytest.mark.parametrize("change, message", [
    (dict(grid="pow2"), "uniform grids"),
    (dict(dtype=jnp.float32), "bfloat16 activations"),
    (dict(n=100), "not a multiple of block_n"),
    (dict(group_size=32), "group_size 32"),
    (dict(block_m=32), "block_m"),
    (dict(block_n=300), "block_n"),
])
def test_products_outside_the_scope_are_named(change, message):
  setting = dict(grid="asymmetric", dtype=jnp.bfloat16, n=128, group_size=128,
                 block_m=64, block_n=64)
  setting.update(change)
  packed = random_packed(setting["grid"], "group", 4, k=256, n=setting["n"],
                         group_size=setting["group_size"], k_tile=128)
  x = jnp.zeros((4, 256), setting["dtype"])
  blocks = dict(block_m=setting["block_m"], block_n=setting["block_n"])
  assert message in hopper.unsupported_reason(x, packed, **blocks)
  with pytest.raises(ValueError, match=message):
    hopper.hopper_quantized_matmul(x, packed, interpret=True, **blocks)


def test_a_wrong_input_width_is_refused():
  packed = random_packed("asymmetric", "group", 4, k=256, n=64, group_size=128,
                         k_tile=128)
  with pytest.raises(ValueError, match="x has 128 input features, the weight expects 256"):
    hopper.hopper_quantized_matmul(jnp.zeros((2, 128), jnp.bfloat16), packed)


def _fake_devices(capability):
  return lambda *_: [types.SimpleNamespace(compute_capability=capability)]


def test_selection_needs_sm90_the_flag_and_default_blocks(monkeypatch):
  packed = random_packed("asymmetric", "group", 4, k=256, n=128, group_size=128,
                         k_tile=128)
  x = jnp.zeros((4, 256), jnp.bfloat16)
  pick = lambda **kw: hopper.selected(x, packed, **{
      **dict(platform="gpu", interpret=False, block_m=None, block_n=None), **kw})
  monkeypatch.setattr(jax, "devices", _fake_devices("9.0"))
  assert not pick()  # not preferred until the GPU check shows it faster
  monkeypatch.setattr(hopper, "PREFERRED_ON_SM90", True)
  assert pick()
  assert not pick(platform="tpu")
  assert not pick(interpret=True)
  assert not pick(block_n=128)
  assert not hopper.selected(x.astype(jnp.float32), packed, platform="gpu",
                             interpret=False, block_m=None, block_n=None)
  monkeypatch.setattr(jax, "devices", _fake_devices("8.0"))
  assert not pick()


def test_quantized_matmul_lowers_the_hopper_kernel_once_selected(monkeypatch):
  packed = _abstract(random_packed("asymmetric", "group", 4, k=256, n=128,
                                   group_size=128, k_tile=128))
  x = jax.ShapeDtypeStruct((8, 256), jnp.bfloat16)
  lower = lambda: jax.jit(lambda x, p: kernels.quantized_matmul(
      x, p, platform="gpu", interpret=False)).trace(x, packed).lower(
          lowering_platforms=("cuda",)).as_text()
  assert "triton" in lower()
  monkeypatch.setattr(jax, "devices", _fake_devices("9.0"))
  monkeypatch.setattr(hopper, "PREFERRED_ON_SM90", True)
  text = lower()
  assert "mosaic_gpu" in text and "triton" not in text
