"""Tests of ``grouped_quantized_matmul`` (interpret mode on CPU): the product of
grouped and depthwise convolutions as one Pallas kernel whose leading grid axis
is the weight group, bit for bit equal to ``jax.vmap`` of ``quantized_matmul``
over the groups and to the per-group reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from quant_core.deploy import kernels as qm
from tests.quant_core.deploy import test_quantized_matmul

ROWS = 37  # ragged for BLOCK_M
BLOCK_M = 16
# (groups, K, N): a depthwise 3x3 conv (one input and output channel a
# group), a grouped conv (4 input channels and 4 outputs a group), and a
# group-wise shape whose K = 24 pads to 32 (a group of padding rows).
DEPTHWISE, GROUPED, GROUPWISE = (8, 9, 1), (2, 36, 4), (2, 24, 4)
GROUP_SIZE = 8

# (grid, granularity, bits, dtype, (G, K, N), k_tile). A k_tile of 16 gives
# GROUPED three K steps and GROUPWISE two (two groups of 8 a step), so a
# step's activation block must be found inside its weight group's columns.
CASES = [
    ("asymmetric", "channel", 4, jnp.float32, DEPTHWISE, None),
    ("asymmetric", "channel", 4, jnp.int8, GROUPED, 16),
    ("symmetric", "channel", 3, jnp.bfloat16, GROUPED, 16),
    ("symmetric", "channel", 3, jnp.int8, DEPTHWISE, None),
    ("asymmetric", "channel", 8, jnp.int8, DEPTHWISE, None),
    ("asymmetric", "channel", 8, jnp.bfloat16, GROUPED, 16),
    ("asymmetric", "group", 4, jnp.bfloat16, GROUPWISE, 16),
    ("asymmetric", "group", 4, jnp.int8, (8, 16, 1), 16),
    ("symmetric", "group", 3, jnp.float32, GROUPWISE, 16),
    ("pow2", "channel", 4, jnp.float32, DEPTHWISE, None),
    ("pow2", "channel", 4, jnp.int8, GROUPED, 16),
    ("pow2", "layer", 5, jnp.int8, DEPTHWISE, None),  # two exponent bands
    ("pow2", "group", 4, jnp.bfloat16, GROUPWISE, 16),
]


def _stacked(per_group):
  """The groups' packed weights with a leading groups axis on every array."""
  return jax.tree.map(lambda *arrays: jnp.stack(arrays), *per_group)


def _random_case(grid, granularity, bits, shape, k_tile, seed,
                 group_size=GROUP_SIZE):
  """``(per-group packed weights, the same stacked)`` for ``shape = (G, K,
  N)``."""
  groups, k, n = shape
  per_group = [test_quantized_matmul.random_packed(
      grid, granularity, bits, k=k, n=n, group_size=group_size, k_tile=k_tile,
      seed=1000 * seed + g) for g in range(groups)]
  return per_group, _stacked(per_group)


def _activations(dtype, shape, seed, *, exact):
  """Random activations; with ``exact`` float ones are small integers, so
  every product and f32 partial sum is exact and any summation order (kernel
  chunks, reference dots, other block shapes) gives the same bits."""
  rng = np.random.default_rng(seed)
  if dtype == jnp.int8:
    return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)
  if exact:
    return jnp.asarray(rng.integers(-8, 9, shape), dtype)
  return jnp.asarray(rng.normal(size=shape), dtype)


def _vmapped(x, packed, **options):
  """The former path: ``jax.vmap`` of ``quantized_matmul`` over the groups."""
  return jax.vmap(lambda xg, pg: qm.quantized_matmul(xg, pg, **options),
                  in_axes=(1, 0), out_axes=1)(x, packed)


def _reference_by_group(x, per_group):
  return jnp.stack([qm.quantized_matmul_reference(x[:, g], packed)
                    for g, packed in enumerate(per_group)], axis=1)


def _assert_bitwise(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  unsigned = np.dtype(f"uint{8 * actual.dtype.itemsize}")
  np.testing.assert_array_equal(actual.view(unsigned), expected.view(unsigned))


@pytest.mark.parametrize("grid,granularity,bits,dtype,shape,k_tile", CASES)
def test_matches_vmap_and_reference_bitwise(grid, granularity, bits, dtype,
                                            shape, k_tile):
  groups, k, n = shape
  per_group, packed = _random_case(grid, granularity, bits, shape, k_tile,
                                   seed=bits)
  blocks = dict(block_m=BLOCK_M, block_n=max(1, n // 2))
  x = _activations(dtype, (ROWS, groups, k), seed=1, exact=False)
  y = qm.grouped_quantized_matmul(x, packed, **blocks)
  assert y.shape == (ROWS, groups, n)
  assert y.dtype == (jnp.float32 if dtype == jnp.int8 else dtype)
  # The same blocks: the same dots in the same order, any activations.
  _assert_bitwise(y, _vmapped(x, packed, **blocks))
  # Exact activations: equal whatever the blocks, so also with the default
  # ones (which differ between the two paths) and the reference.
  exact = _activations(dtype, (ROWS, groups, k), seed=2, exact=True)
  expected = _reference_by_group(exact, per_group)
  _assert_bitwise(qm.grouped_quantized_matmul(exact, packed), expected)
  _assert_bitwise(qm.grouped_quantized_matmul_reference(exact, packed),
                  expected)
  _assert_bitwise(_vmapped(exact, packed), expected)


@pytest.mark.parametrize("grid,granularity,bits,dtype", [
    ("asymmetric", "group", 4, jnp.int8),
    ("pow2", "channel", 6, jnp.bfloat16)])
def test_fori_loop_form_matches_grid_form(grid, granularity, bits, dtype):
  groups, k, n = GROUPWISE
  _, packed = _random_case(grid, granularity, bits, GROUPWISE, 16, seed=3)
  x = _activations(dtype, (ROWS, groups, k), seed=4, exact=False)
  blocks = dict(block_m=BLOCK_M, block_n=2)
  grid_form = qm.grouped_quantized_matmul(x, packed, k_loop="grid", **blocks)
  fori_form = qm.grouped_quantized_matmul(x, packed, k_loop="fori", **blocks)
  _assert_bitwise(fori_form, grid_form)
  _assert_bitwise(fori_form, _vmapped(x, packed, k_loop="fori", **blocks))


def test_leading_batch_axes():
  groups, k, n = GROUPED
  _, packed = _random_case("asymmetric", "channel", 4, GROUPED, 16, seed=5)
  x = _activations(jnp.float32, (2, 5, groups, k), seed=6, exact=False)
  y = qm.grouped_quantized_matmul(x, packed)
  assert y.shape == (2, 5, groups, n)
  _assert_bitwise(y.reshape(10, groups, n), qm.grouped_quantized_matmul(
      x.reshape(10, groups, k), packed))


def _pallas_calls(jaxpr):
  """Every ``pallas_call`` equation of ``jaxpr`` and its sub-jaxprs."""
  calls = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      calls.append(eqn)
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jex_core.ClosedJaxpr):
          calls += _pallas_calls(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          calls += _pallas_calls(sub)
  return calls


def _kernel_grid(product, x, packed):
  """``(grid, vmapped grid axes)`` of the single kernel ``product`` runs."""
  calls = _pallas_calls(jax.make_jaxpr(product)(x, packed).jaxpr)
  assert len(calls) == 1
  grid_mapping = calls[0].params["grid_mapping"]
  return tuple(grid_mapping.grid), tuple(grid_mapping.vmapped_dims)


def _abstract(packed):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), packed)


def test_one_kernel_with_the_groups_as_its_leading_grid_axis():
  groups, k, n = GROUPED  # three K steps of 16
  _, packed = _random_case("pow2", "channel", 4, GROUPED, 16, seed=7)
  x = jax.ShapeDtypeStruct((ROWS, groups, k), jnp.float32)
  blocks = dict(block_m=BLOCK_M, block_n=2)
  grid, vmapped = _kernel_grid(
      lambda x, p: qm.grouped_quantized_matmul(x, p, **blocks), x,
      _abstract(packed))
  assert grid == (groups, 3, 2, 3) and vmapped == ()
  # The check tells a vmap of the single-group kernel apart: its batched
  # pallas_call has the groups as a vmapped grid axis over the per-group grid.
  grid, vmapped = _kernel_grid(lambda x, p: _vmapped(x, p, **blocks), x,
                               _abstract(packed))
  assert vmapped and grid != (groups, 3, 2, 3)


def test_default_blocks_run_a_depthwise_layer_in_one_program_per_group():
  # 32-channel depthwise 3x3 conv at 4x112x112 (traced only, not run).
  rows, groups = 4 * 112 * 112, 32
  _, packed = _random_case("pow2", "layer", 5, (groups, 9, 1), None, seed=8)
  assert packed.k_tile == 32
  assert qm.default_grouped_blocks("cpu", rows, 1, 32) == (rows, 1)
  x = jax.ShapeDtypeStruct((rows, groups, 9), jnp.float32)
  grid, vmapped = _kernel_grid(qm.grouped_quantized_matmul, x,
                               _abstract(packed))
  assert grid == (groups, 1, 1, 1) and vmapped == ()


@pytest.mark.parametrize("platform,lowering,marker", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"),
    ("tpu", "tpu", "tpu_custom_call"),
])
@pytest.mark.parametrize("grid,granularity,bits,dtype", [
    ("asymmetric", "group", 4, jnp.bfloat16),   # int4 g128, tile scales
    ("pow2", "channel", 8, jnp.int8),           # ten exponent bands
])
def test_kernel_lowers_for_accelerators(platform, lowering, marker, grid,
                                        granularity, bits, dtype):
  # Lowering runs the Pallas Triton / Mosaic TPU lowering without hardware.
  groups, k, n = 2, 640, 300
  k_tile = 128 if platform == "gpu" else 512
  _, packed = _random_case(grid, granularity, bits, (groups, k, n), k_tile,
                           seed=9, group_size=128)
  x = jax.ShapeDtypeStruct((16, groups, k), dtype)
  run = jax.jit(lambda x, p: qm.grouped_quantized_matmul(
      x, p, platform=platform, interpret=False))
  text = run.trace(x, _abstract(packed)).lower(
      lowering_platforms=(lowering,)).as_text()
  assert marker in text


def test_input_errors():
  groups, k, n = GROUPED
  per_group, packed = _random_case("asymmetric", "channel", 4, GROUPED, 16,
                                   seed=10)
  x = jnp.zeros((ROWS, groups, k))
  with pytest.raises(ValueError, match="stack the groups"):
    qm.grouped_quantized_matmul(x, per_group[0])
  with pytest.raises(ValueError, match="stack the groups"):
    qm.grouped_quantized_matmul(jnp.zeros((ROWS, groups + 1, k)), packed)
  with pytest.raises(ValueError, match="last axis K=36"):
    qm.grouped_quantized_matmul(jnp.zeros((ROWS, groups, k - 1)), packed)
  with pytest.raises(ValueError, match="groups, K"):
    qm.grouped_quantized_matmul(jnp.zeros((k,)), packed)
  with pytest.raises(ValueError, match="block_m"):
    qm.grouped_quantized_matmul(x, packed, block_m=0)
