"""Packed inference of whole models: the solvers' codes re-laid (pack_quantization),
codes recovered from de-quantized kernels (pack_layers), INQ models (pack_model), every
layer kind through quantized_matmul, and one compilation per input shape."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import inq_jax
from inq_jax import inq
from quant_core import deploy
from tests import helpers


class _Net(nn.Module):
  """Conv, grouped conv, depthwise conv, DenseGeneral, Einsum, Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=2)(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False)(x))
    x = x.reshape(x.shape[0], -1, 8)
    x = nn.DenseGeneral((2, 3), axis=-1)(x)
    x = nn.Einsum((2, 3, 5), "btij,ijk->bkt")(x)
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


MODEL = _Net()
X = jax.random.normal(jax.random.key(0), (2, 9, 9, 3), jnp.float32)
VARIABLES = MODEL.init(jax.random.key(1), X)


@pytest.mark.parametrize("grid, granularity, group_size", [
    ("pow2", "channel", None),
    ("asymmetric", "group", 32),
])
def test_packed_model_matches_dequantized_model(grid, granularity, group_size):
  solver = comq_jax.rtn(bits=4, grid=grid, granularity=granularity, group_size=group_size)
  result = comq_jax.quantize_model(MODEL, VARIABLES, [X], solver)
  packed = deploy.pack_quantization(result)
  for path, report in zip(["Conv_1", "Conv_2", "DenseGeneral_0", "Einsum_0"],
                          result.layers[1:5], strict=True):
    layer = packed["params"][path]["kernel"]
    assert isinstance(layer, deploy.PackedLayer) and report.path == path
    assert (layer.groups, *layer.matrices.shape) == report.matrices
  expected = MODEL.apply(result.variables, X)
  got = deploy.jit_packed_apply(MODEL)(packed, X)
  assert got.dtype == expected.dtype
  # The same products summed in another order (f32): a few ulps of the outputs.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# A depthwise conv then a Dense: the other grids and granularities, on a smaller model.
class _Small(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(x))
    return nn.Dense(3)(nn.relu(nn.Dense(40)(x)))


_SMALL = _Small()
_SMALL_X = jax.random.normal(jax.random.key(7), (2, 5, 5, 4), jnp.float32)


@pytest.mark.parametrize("grid, granularity, group_size", [
    ("pow2", "layer", None),
    ("asymmetric", "channel", None),
    ("symmetric", "channel", None),
    ("symmetric", "group", 32),
])
def test_small_packed_model_matches_dequantized_model(grid, granularity, group_size):
  variables = _SMALL.init(jax.random.key(8), _SMALL_X)
  solver = comq_jax.rtn(bits=4, grid=grid, granularity=granularity, group_size=group_size)
  result = comq_jax.quantize_model(_SMALL, variables, [_SMALL_X], solver)
  packed = deploy.pack_quantization(result)
  assert packed["params"]["depthwise"]["kernel"].groups == 4
  np.testing.assert_allclose(deploy.jit_packed_apply(_SMALL)(packed, _SMALL_X),
                             _SMALL.apply(result.variables, _SMALL_X), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric"])
def test_codes_are_recovered_exactly_after_a_scale_update(grid):
  # COMQ's scale update moves the step off the min-max rule: the grid is recovered
  # from the values, and unpacking gives every weight back bit for bit.
  w = jax.random.normal(jax.random.key(2), (70, 37), jnp.float32)
  x = jax.random.normal(jax.random.key(3), (128, 70), jnp.float32)
  result = comq_jax.comq(bits=4, grid=grid, scale_update=True).quantize_layer(w, x)
  packed = deploy.pack_matrix_values(result.weights, bits=4, grid=grid,
                                     granularity="channel")
  np.testing.assert_array_equal(deploy.unpack(packed), result.weights)


def test_values_off_every_grid_raise_naming_the_layer():
  # Float weights whose codes are lost pack by recovering the grid from the values
  # (pack_layers); values on no grid of the stated kind are refused, naming the layer.
  model = nn.Sequential([nn.Dense(4)])
  x = jax.random.normal(jax.random.key(9), (8, 6), jnp.float32)
  result = comq_jax.quantize_model(model, model.init(jax.random.key(10), x), [x],
                                   comq_jax.rtn(bits=3))
  options = dict(bits=3, grid="asymmetric", granularity="channel")
  # The quantized weights recover their grid exactly ...
  packed = deploy.pack_layers(result.variables, model, x, ["layers_0"], **options)
  restored = deploy.unpack(packed)["params"]["layers_0"]["kernel"]
  np.testing.assert_array_equal(restored, result.variables["params"]["layers_0"]["kernel"])
  # ... and weights moved off it are refused.
  params = jax.tree.map(lambda leaf: leaf, result.variables["params"])
  params["layers_0"]["kernel"] = params["layers_0"]["kernel"] * 1.001 + 1e-4
  with pytest.raises(ValueError, match=r"^layers_0: \d+ of 4 grid cells hold values on "
                     r"no 3-bit asymmetric grid .*channel 0"):
    deploy.pack_layers({"params": params}, model, x, ["layers_0"], **options)


def test_pack_quantization_refuses_what_it_cannot_pack_exactly():
  model = nn.Sequential([nn.Dense(4)])
  x = jax.random.normal(jax.random.key(9), (8, 6), jnp.float32)
  variables = model.init(jax.random.key(10), x)
  # A shrink factor: the levels scalar·(z + t)·step are not scale·(code - zero_point).
  shrunk = comq_jax.quantize_model(model, variables, [x], comq_jax.rtn(bits=3, scalar=0.9))
  with pytest.raises(ValueError, match=r"^layers_0: quantized with scalar=0.9"):
    deploy.pack_quantization(shrunk)
  # A report without its codes (rebuilt from a record) points to pack_layers.
  result = comq_jax.quantize_model(model, variables, [x], comq_jax.rtn(bits=3))
  bare = result._replace(layers=[report._replace(quantization=None)
                                 for report in result.layers])
  with pytest.raises(ValueError, match=r"^layers_0: the report holds no codes.*pack_layers"):
    deploy.pack_quantization(bare)
  # A kernel changed after quantization no longer matches its codes.
  params = result.variables["params"]
  kernel = params["layers_0"]["kernel"]
  edited = result._replace(variables={"params": {"layers_0": dict(
      params["layers_0"], kernel=kernel.at[0, 0].set(kernel[0, 0] + 1.0))}})
  with pytest.raises(ValueError, match=r"^layers_0: the kernel in result.variables is not"):
    deploy.pack_quantization(edited)


# A strided conv, then a Dense over the last axis of its 4-D output.
_INQ_MODEL = nn.Sequential([nn.Conv(6, (3, 3), strides=(2, 1)), nn.relu, nn.Dense(5)])
_INQ_X = jax.random.normal(jax.random.key(4), (2, 7, 6, 3), jnp.float32)


def _inq_quantized():
  variables = _INQ_MODEL.init(jax.random.key(5), _INQ_X)
  quantizer = inq(5)
  params, state = quantizer.step(variables["params"],
                                 quantizer.init(variables["params"]), 1.0)
  return {"params": params}, state


def test_inq_kernels_packed_over_their_views_run_and_unpack_exactly():
  # pack_model packs each kernel as its view's matrices (a conv's rows in im2col
  # patch order, no permutation at apply time), under the state's n1.
  variables, state = _inq_quantized()
  packed = inq_jax.pack_model(_INQ_MODEL, variables, state, _INQ_X)
  for name in ("layers_0", "layers_2"):
    layer = packed["params"][name]["kernel"]
    assert isinstance(layer, deploy.PackedLayer)
    assert isinstance(layer.matrices, deploy.PackedPow2)
    np.testing.assert_array_equal(layer.matrices.n1, [state.n1[name]["kernel"]])
  assert packed["params"]["layers_0"]["kernel"].kernel_perm is None
  np.testing.assert_allclose(deploy.packed_apply(_INQ_MODEL, packed, _INQ_X),
                             _INQ_MODEL.apply(variables, _INQ_X), rtol=1e-5, atol=1e-6)
  restored = deploy.unpack(packed)
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  for got, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(variables),
                           strict=True):
    assert np.asarray(got).dtype == expected.dtype
    assert np.asarray(got).tobytes() == np.asarray(expected).tobytes()


def test_a_bare_packed_kernel_in_the_tree_is_refused():
  # A kernel packed whole (a bare PackedPow2, rows in the kernel's row-major order)
  # is no longer run: packed_apply names the layer and says what to pack instead.
  variables, state = _inq_quantized()
  params = dict(variables["params"])
  kernel = params["layers_0"]["kernel"]
  params["layers_0"] = dict(params["layers_0"], kernel=deploy.pack(
      kernel, 5, state.n1["layers_0"]["kernel"]))
  with pytest.raises(ValueError, match=r"layers_0: its kernel is a bare packed weight; "
                     r"packed_apply runs PackedLayer kernels.*inq_jax.pack_model"):
    deploy.packed_apply(_INQ_MODEL, {"params": params}, _INQ_X)


def test_jitted_packed_apply_compiles_once_per_input_shape():
  model = nn.Dense(5)
  xs = [jax.random.normal(jax.random.key(i), (3, 13), jnp.float32) for i in range(3)]
  variables = model.init(jax.random.key(6), xs[0])
  result = comq_jax.quantize_model(model, variables, xs[:1], comq_jax.rtn(bits=4))
  packed = deploy.pack_quantization(result)
  with helpers.count_compilations() as compilations:
    for x in xs:
      # An equal, freshly built module gets the same cached jitted function.
      got = deploy.jit_packed_apply(nn.Dense(5))(packed, x)
      np.testing.assert_allclose(got, model.apply(result.variables, x), rtol=1e-5,
                                 atol=1e-6)
  assert compilations[0] == 1


class _NNXNet(nnx.Module):
  """The NNX kinds: conv, grouped conv, LinearGeneral, Einsum, Linear."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, strides=2, rngs=rngs)
    self.general = nnx.LinearGeneral(8, (2, 3), rngs=rngs)
    self.einsum = nnx.Einsum("btij,ijk->bkt", (2, 3, 5), (5,), rngs=rngs)
    self.head = nnx.Linear(125, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.grouped(nnx.relu(self.conv(x))))
    x = self.einsum(self.general(x.reshape(x.shape[0], -1, 8)))
    return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("grid, granularity, group_size", [
    ("pow2", "channel", None),
    ("asymmetric", "group", 8),
])
def test_nnx_packed_model_matches_dequantized_model(grid, granularity, group_size, tmp_path):
  model = _NNXNet(nnx.Rngs(0))
  solver = comq_jax.rtn(bits=4, grid=grid, granularity=granularity, group_size=group_size)
  result = comq_jax.quantize_model(model, None, [X], solver)
  assert [r.path for r in result.layers] == ["conv", "grouped", "general", "einsum",
                                             "head"]
  packed = deploy.pack_quantization(result)
  assert all(isinstance(packed["params"][r.path]["kernel"], deploy.PackedLayer)
             for r in result.layers)
  kernel_before = np.asarray(result.model.head.kernel[...])
  expected = result.model(X)
  with helpers.count_compilations() as compilations:
    for _ in range(2):
      got = deploy.jit_packed_apply(result.model)(packed, X)
  assert compilations[0] == 1
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The user's module keeps its float kernels.
  np.testing.assert_array_equal(result.model.head.kernel[...], kernel_before)
  # Through the packed model file too.
  deploy.save_packed(str(tmp_path / "model.safetensors"), packed)
  loaded = deploy.load_packed(str(tmp_path / "model.safetensors"), like=result.variables)
  np.testing.assert_array_equal(deploy.packed_apply(result.model, loaded, X),
                                deploy.packed_apply(result.model, packed, X))


class _NNXConvBN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
    self.head = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


def test_nnx_jitted_packed_apply_reads_the_module_state_of_each_call():
  """Batch statistics changed after the first call are used by the next one, and an
  equal module (same structure, other arrays) shares the compiled function."""
  model = _NNXConvBN(nnx.Rngs(0))
  result = comq_jax.quantize_model(model, None, [X], comq_jax.rtn(bits=4))
  packed = deploy.pack_quantization(result)
  other = _NNXConvBN(nnx.Rngs(1))
  other_packed = deploy.pack_quantization(
      comq_jax.quantize_model(other, None, [X], comq_jax.rtn(bits=4)))
  shifted_mean = jax.device_put(np.asarray(result.model.norm.mean[...]) + 0.5)
  with helpers.count_compilations() as compilations:
    before = deploy.jit_packed_apply(result.model)(packed, X)
    result.model.norm.mean[...] = shifted_mean
    after = deploy.jit_packed_apply(result.model)(packed, X)
    deploy.jit_packed_apply(other)(other_packed, X)
  assert compilations[0] == 1
  assert not np.allclose(before, after)
  np.testing.assert_allclose(after, deploy.packed_apply(result.model, packed, X),
                             rtol=1e-5, atol=1e-6)
