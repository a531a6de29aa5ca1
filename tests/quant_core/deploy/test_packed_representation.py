"""One packed representation for every method: the packed codes of a COMQ, GPTQ or RTN
result are the solver's own, and INQ, COMQ, GPTQ and RTN all pack to PackedLayer
kernels that run through packed_apply and unpack to the exact quantized variables."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import inq_jax
from quant_core import deploy
from quant_core import paths
from quant_core.deploy import codes as packed_codes
from tests import helpers

# Small images: interpret-mode kernels stay quick.
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float32)
GROUP_SIZE = 16


class _CNN(nn.Module):
  """A conv, a depthwise conv, a grouped conv and two Dense layers.

  View matrices (groups, d_in, d_out): conv (1, 27, 4), depthwise (4, 9, 1), grouped
  (2, 18, 2), fc (1, 64, 16), head (1, 16, 5): with groups of 16 inputs, short last
  groups (27, 18, 9) and several groups (27, 18, 64).
  """

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(x))
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, feature_group_count=2, name="grouped")(x))
    x = nn.relu(nn.Dense(16, name="fc")(x.reshape(x.shape[0], -1)))
    return nn.Dense(5, name="head")(x)


MODEL = _CNN()
LAYERS = ("conv", "depthwise", "grouped", "fc", "head")

# Per method, each layer's grid: channel and group grids, asymmetric and symmetric
# (and the power-of-two grid for COMQ), in one model through rules.
_CHANNEL = dict(granularity="channel")
_GROUP = dict(granularity="group", group_size=GROUP_SIZE)
GRIDS = {
    "comq": {"conv": dict(grid="asymmetric", **_CHANNEL),
             "depthwise": dict(grid="pow2", **_CHANNEL),
             "grouped": dict(grid="symmetric", **_GROUP),
             "fc": dict(grid="asymmetric", **_GROUP),
             "head": dict(grid="pow2", **_GROUP)},
    "gptq": {"conv": dict(grid="symmetric", **_GROUP),
             "depthwise": dict(grid="asymmetric", **_CHANNEL),
             "grouped": dict(grid="asymmetric", **_GROUP),
             "fc": dict(grid="symmetric", **_CHANNEL),
             "head": dict(grid="asymmetric", **_GROUP)},
    "rtn": {"conv": dict(grid="asymmetric", **_GROUP),
            "depthwise": dict(grid="symmetric", **_CHANNEL),
            "grouped": dict(grid="symmetric", **_GROUP),
            "fc": dict(grid="asymmetric", **_CHANNEL),
            "head": dict(grid="symmetric", **_GROUP)},
}


def _solver(method: str, grid: dict):
  if method == "comq":  # The scale update moves the scales off the min-max rule.
    return comq_jax.comq(bits=4, scale_update=True, iters=2, **grid)
  return {"gptq": comq_jax.gptq, "rtn": comq_jax.rtn}[method](bits=4, **grid)


def _quantize(method: str):
  """``quantize_model`` of :data:`MODEL` with :data:`GRIDS`'s solver per layer."""
  variables = MODEL.init(jax.random.key(1), X)
  rules = [(path, _solver(method, grid)) for path, grid in GRIDS[method].items()]
  result = comq_jax.quantize_model(MODEL, variables, [X], rules[-1][1], rules=rules[:-1])
  assert [report.path for report in result.layers] == list(LAYERS)
  assert not result.skipped
  return result


def _kernels(variables):
  """``{"/"-joined module path: kernel}`` of a variables tree (packed kernels whole)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda leaf: isinstance(leaf, deploy.PackedLayer))
  return {paths.path_name(path[:-1]): leaf for path, leaf in flat
          if paths.key_of(path[-1]) == "kernel"}


def _solver_layout(array, group: int) -> np.ndarray:
  """A solver array of feature group ``group`` in the packed layout: ``(d_out,)`` per
  channel as it is, ``(d_out, groups along K)`` transposed to ``(groups, d_out)``."""
  return np.asarray(array[group]).T


def _assert_packed_codes_are_the_solvers(result, packed):
  """(a): every group's packed matrix holds the solver's codes and grid parameters,
  the per-channel ``(d_out, groups)`` arrays laid out as ``(groups along K, N)``."""
  for report in result.layers:
    quantization, view = report.quantization, report.view
    layer = paths.get(packed["params"], report.path.split("/"))["kernel"]
    assert isinstance(layer, deploy.PackedLayer)
    assert (layer.groups, *layer.matrices.shape) == report.matrices == (
        view.groups, view.d_in, view.d_out)
    assert quantization.codes.shape == report.matrices
    grid = GRIDS[report.solver.method][report.path]
    assert (quantization.grid, quantization.group_size) == (grid["grid"],
                                                            grid.get("group_size"))
    num_groups = 1 if quantization.group_size is None else -(-view.d_in // GROUP_SIZE)
    param_shape = (view.d_out,) if quantization.group_size is None else (num_groups,
                                                                         view.d_out)
    for g in range(layer.groups):
      matrix = layer.group(g)
      assert (matrix.bits, matrix.group_size) == (4, quantization.group_size)
      if quantization.grid == "pow2":
        assert isinstance(matrix, packed_codes.PackedPow2)
        assert matrix.n1.shape == param_shape
        np.testing.assert_array_equal(matrix.n1, _solver_layout(quantization.exponent, g))
        np.testing.assert_array_equal(packed_codes.unpack_matrix(matrix), quantization.weights[g])
        continue
      assert isinstance(matrix, packed_codes.PackedUniform)
      np.testing.assert_array_equal(packed_codes.unpack_codes(matrix)[:view.d_in],
                                    quantization.codes[g])
      assert matrix.scale.shape == param_shape
      assert matrix.scale.dtype == jnp.float32
      np.testing.assert_array_equal(matrix.scale, _solver_layout(quantization.scale, g))
      if quantization.grid == "symmetric":
        assert matrix.zero_point is None
        np.testing.assert_array_equal(quantization.zero_point[g], 2**(4 - 1) - 1)
      else:
        assert matrix.zero_point.shape == param_shape
        np.testing.assert_array_equal(matrix.zero_point,
                                      _solver_layout(quantization.zero_point, g))


def _assert_one_representation(model, packed, quantized_variables, x):
  """(b): every kernel is a PackedLayer, the packed model runs as the quantized one,
  and unpacking gives the quantized variables back bit for bit."""
  kernels = _kernels(packed)
  assert set(kernels) == set(_kernels(quantized_variables))
  assert all(isinstance(kernel, deploy.PackedLayer) for kernel in kernels.values())
  expected = model.apply(quantized_variables, x)
  got = deploy.packed_apply(model, packed, x)
  assert got.dtype == expected.dtype
  # The same products summed in another order (f32): a few ulps of the outputs.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  helpers.assert_trees_bitwise_equal(deploy.unpack(packed), quantized_variables)


@pytest.mark.parametrize("method", ["comq", "gptq", "rtn"])
def test_ptq_packs_the_solvers_own_codes_into_packed_layers(method):
  result = _quantize(method)
  packed = deploy.pack_quantization(result)
  _assert_packed_codes_are_the_solvers(result, packed)
  _assert_one_representation(MODEL, packed, result.variables, X)


def test_inq_packs_into_the_same_representation():
  params = MODEL.init(jax.random.key(1), X)["params"]
  quantizer = inq_jax.inq(bits=5)
  state = quantizer.init(params)
  for portion in inq_jax.SCHEDULES[5]:  # No retraining between the steps.
    params, state = quantizer.step(params, state, portion)
  variables = {"params": params}
  packed = inq_jax.pack_model(MODEL, variables, state, X)
  for path, layer in _kernels(packed).items():
    assert isinstance(layer.matrices, packed_codes.PackedPow2)
    # Every group under the layer's n1 from the state.
    np.testing.assert_array_equal(layer.matrices.n1,
                                  [state.n1[path]["kernel"]] * layer.groups)
  assert _kernels(packed)["depthwise"].groups == 4
  _assert_one_representation(MODEL, packed, variables, X)


class _NNXNet(nnx.Module):
  """A conv, a depthwise conv and a Linear head."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
    self.head = nnx.Linear(8 * 8 * 4, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.depthwise(nnx.relu(self.conv(x))))
    return self.head(x.reshape(x.shape[0], -1))


def test_nnx_comq_packs_into_the_same_representation():
  model = _NNXNet(nnx.Rngs(0))
  solver = comq_jax.comq(bits=4, scale_update=True, iters=2, grid="symmetric",
                         granularity="group", group_size=GROUP_SIZE)
  result = comq_jax.quantize_model(model, None, [X], solver)
  assert [report.path for report in result.layers] == ["conv", "depthwise", "head"]
  # The quantized variables are the pure dict of the quantized module's parameters.
  helpers.assert_trees_bitwise_equal(result.variables["params"],
                              nnx.to_pure_dict(nnx.state(result.model, nnx.Param)))
  packed = deploy.pack_quantization(result)
  assert packed["params"]["depthwise"]["kernel"].groups == 4
  for report in result.layers:
    layer = packed["params"][report.path]["kernel"]
    assert isinstance(layer, deploy.PackedLayer)
    for g in range(layer.groups):
      np.testing.assert_array_equal(
          packed_codes.unpack_codes(layer.group(g))[:report.view.d_in],
          report.quantization.codes[g])
  expected = result.model(X)
  got = deploy.packed_apply(result.model, packed, X)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  helpers.assert_trees_bitwise_equal(deploy.unpack(packed), result.variables)


class _NNXStack(nnx.Module):
  """Blocks in an nnx.List: their state dict keys are the integers 0, 1."""

  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])

  def __call__(self, x):
    for block in self.blocks:
      x = nnx.relu(block(x))
    return x


def test_nnx_list_of_blocks_packs_and_runs():
  model = _NNXStack(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 8))
  result = comq_jax.quantize_model(model, None, [x], comq_jax.rtn(bits=4))
  assert [report.path for report in result.layers] == ["blocks/0", "blocks/1"]
  assert list(result.variables["params"]["blocks"]) == [0, 1]
  # "blocks/0" names the integer key 0.
  assert paths.get(result.variables["params"], ["blocks", "0"])["kernel"].shape == (8, 8)
  packed = deploy.pack_quantization(result)
  assert isinstance(packed["params"]["blocks"][1]["kernel"], deploy.PackedLayer)
  np.testing.assert_allclose(deploy.packed_apply(result.model, packed, x), result.model(x),
                             rtol=1e-5, atol=1e-6)


class _BF16Net(nn.Module):
  """Kernels (and activations) in bfloat16."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), param_dtype=jnp.bfloat16, name="conv")(x))
    x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=4, param_dtype=jnp.bfloat16,
                        name="depthwise")(x))
    return nn.Dense(5, param_dtype=jnp.bfloat16, name="head")(x.reshape(x.shape[0], -1))


def test_bfloat16_kernels_unpack_to_bfloat16_bitwise():
  model = _BF16Net()
  x = X[:, :6, :6].astype(jnp.bfloat16)
  variables = model.init(jax.random.key(1), x)
  solver = comq_jax.rtn(bits=4, grid="symmetric", granularity="group", group_size=GROUP_SIZE)
  result = comq_jax.quantize_model(model, variables, [x], solver)
  params = variables["params"]
  quantizer = inq_jax.inq(bits=5)
  params, state = quantizer.step(params, quantizer.init(params), 1.0)
  inq_variables = {"params": params}
  packed_ptq = deploy.pack_quantization(result)
  for packed, quantized in ((packed_ptq, result.variables),
                            (inq_jax.pack_model(model, inq_variables, state, x),
                             inq_variables)):
    kernels = _kernels(packed)
    assert all(isinstance(kernel, deploy.PackedLayer) and kernel.dtype == "bfloat16"
               for kernel in kernels.values())
    restored = deploy.unpack(packed)
    assert all(kernel.dtype == jnp.bfloat16 for kernel in _kernels(restored).values())
    helpers.assert_trees_bitwise_equal(restored, quantized)
  # The packed model runs in bfloat16 as the quantized one does (one bf16 rounding
  # of the outputs apart, products summed in another order).
  expected = model.apply(result.variables, x)
  got = deploy.packed_apply(model, packed_ptq, x)
  assert got.dtype == expected.dtype == jnp.bfloat16
  expected, got = np.asarray(expected, np.float32), np.asarray(got, np.float32)
  assert np.max(np.abs(got - expected)) <= 2**-6 * np.max(np.abs(expected))
