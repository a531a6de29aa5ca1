"""The kernel family compiled for the machine's backend, against the jnp reference.

Marked ``gpu``: outside the default suite. ``benchmarks/gpu_check.py`` runs it on a
GPU, where the kernels compile for real (Triton; Mosaic GPU on sm_90), and its
``--dry-run`` (run by
``tests/benchmarks/test_gpu_check.py`` in CI) runs it on CPU, in interpret mode, so that it
cannot rot. Every case compares ``quantized_matmul`` (and the grouped product) with
``quantized_matmul_reference``: exactly for int8 activations (int32 sums), to f32
summation order for float ones.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant_core.deploy import hopper
from quant_core.deploy import kernels
from tests.quant_core.deploy import test_quantized_matmul

pytestmark = pytest.mark.gpu

# (grid, granularity, bits, group size): uniform 4-bit g128, 2/3/8-bit, power of two.
FORMATS = [
    ("asymmetric", "group", 4, 128),
    ("asymmetric", "channel", 2, None),
    ("symmetric", "channel", 3, None),
    ("symmetric", "channel", 8, None),
    ("asymmetric", "group", 8, 64),
    ("pow2", "channel", 4, None),
    ("pow2", "group", 5, 128),
]
ACTIVATIONS = [jnp.bfloat16, jnp.float32, jnp.int8]
K, N, M = 256, 96, 24


def _activations(dtype, shape, seed):
  rng = np.random.default_rng(seed)
  if dtype == jnp.int8:
    return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)
  return jnp.asarray(rng.normal(size=shape), dtype)


def _close(got, expected, dtype):
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  if dtype == jnp.int8:
    np.testing.assert_array_equal(got, expected)
    return
  # f32 accumulation in another order, then rounding to the activation dtype.
  tolerance = {jnp.bfloat16: 2e-2, jnp.float32: 1e-5}[dtype]
  np.testing.assert_allclose(got, expected, rtol=tolerance,
                             atol=tolerance * float(np.max(np.abs(expected))))


@pytest.mark.parametrize("dtype", ACTIVATIONS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("grid, granularity, bits, group_size", FORMATS)
def test_quantized_matmul_matches_the_reference(grid, granularity, bits, group_size, dtype):
  packed = test_quantized_matmul.random_packed(grid, granularity, bits, k=K, n=N,
                                               group_size=group_size, k_tile=256)
  x = _activations(dtype, (M, K), seed=bits)
  got = jax.jit(kernels.quantized_matmul)(x, packed)
  _close(got, kernels.quantized_matmul_reference(x, packed), dtype)


@pytest.mark.parametrize("dtype", ACTIVATIONS, ids=lambda d: jnp.dtype(d).name)
def test_grouped_product_matches_the_reference(dtype):
  # A depthwise-like layer: 8 groups of (K=32, N=16) matrices, uniform 4-bit.
  per_group = [test_quantized_matmul.random_packed("asymmetric", "channel", 4, k=32, n=16,
                                                   k_tile=32, seed=g) for g in range(8)]
  packed = jax.tree.map(lambda *arrays: jnp.stack(arrays), *per_group)
  x = _activations(dtype, (M, 8, 32), seed=0)
  got = jax.jit(kernels.grouped_quantized_matmul)(x, packed)
  _close(got, kernels.grouped_quantized_matmul_reference(x, packed), dtype)


def test_the_backend_is_the_one_checked():
  # The check reports which backend ran the kernels: compiled on GPU, interpreted on CPU.
  assert jax.default_backend() in kernels.PLATFORMS


@pytest.mark.parametrize("grid, granularity, bits, group_size", [
    ("asymmetric", "group", 4, 128),
    ("symmetric", "channel", 4, None),
    ("asymmetric", "group", 8, 128),
])
def test_hopper_kernel_matches_the_reference(grid, granularity, bits, group_size):
  # Compiled on sm_90; interpreted on CPU (the dry run); other GPUs lack wgmma.
  backend = jax.default_backend()
  capability = str(getattr(jax.devices()[0], "compute_capability", ""))
  if backend == "gpu" and not capability.startswith("9"):
    pytest.skip(f"the Hopper kernel needs sm_90, this GPU is sm_{capability}")
  packed = test_quantized_matmul.random_packed(grid, granularity, bits, k=K, n=128,
                                               group_size=group_size, k_tile=128)
  x = _activations(jnp.bfloat16, (M, K), seed=bits)
  got = jax.jit(functools.partial(hopper.hopper_quantized_matmul,
                                  interpret=backend == "cpu"))(x, packed)
  _close(got, kernels.quantized_matmul_reference(x, packed), jnp.bfloat16)
