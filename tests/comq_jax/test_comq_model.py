"""Tests of COMQ over Flax models (comq_jax.quantize_model)."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import comq_jax
import quant_core
from quant_core import im2col


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(5)(x)


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=2, padding="SAME")(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3, 3), kernel_dilation=2, padding="VALID",
                feature_group_count=2)(x)
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8,
                        padding=((1, 1), (0, 2)))(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(3)(x)


def _conv_cases():
  return [
      nn.Conv(6, (3, 3), strides=2, padding="SAME"),
      nn.Conv(6, (3, 2), kernel_dilation=(2, 1), padding="VALID",
              feature_group_count=2),
      nn.Conv(8, (3, 3), feature_group_count=4, padding=((1, 1), (0, 2))),
      nn.Conv(5, (2, 3), input_dilation=2, padding=((1, 0), (1, 1))),
  ]


@pytest.mark.parametrize("index", range(4))
def test_patches_times_kernel_matrix_is_conv(index):
  conv = _conv_cases()[index]
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  variables = conv.init(jax.random.key(1), x)
  kernel = variables["params"]["kernel"]
  expected = conv.apply(variables, x)
  groups = conv.feature_group_count
  patches = im2col.conv_patches(conv, x)
  patches = patches.reshape(-1, groups, patches.shape[-1] // groups)
  mats = im2col.conv_kernel_matrix(kernel, groups)
  out = jnp.einsum("rgf,gfo->rgo", patches, mats,
                   precision=jax.lax.Precision.HIGHEST)
  bias = variables["params"]["bias"].reshape((1, 1, 1, -1))
  out = out.reshape(expected.shape[:-1] + (-1,)) + bias
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  back = im2col.kernel_from_matrix(mats, kernel.shape)
  np.testing.assert_array_equal(back, kernel)


def _batches(shape, n=3, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.random.normal(k, shape) for k in keys]


def test_mlp_quantize_model_fp_and_sequential():
  model = _MLP()
  batches = _batches((32, 12))
  variables = model.init(jax.random.key(1), batches[0])
  for inputs in ("fp", "sequential"):
    result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=3),
                                     inputs=inputs, train=False)
    new = result.variables
    assert [r.path for r in result.layers] == ["Dense_0", "Dense_1"]
    assert result.skipped == []
    assert result.inputs == inputs
    for r in result.layers:
      assert r.bits == 3
      assert r.error <= r.rtn_error * (1 + 1e-6)
      leaf = new["params"][r.path]
      assert np.unique(np.asarray(leaf["kernel"][:, 0])).size <= 8
      np.testing.assert_array_equal(leaf["bias"],
                                    variables["params"][r.path]["bias"])
  assert not np.array_equal(new["params"]["Dense_1"]["kernel"],
                            variables["params"]["Dense_1"]["kernel"])


def test_fp_report_matches_quantize_layer():
  model = _MLP()
  batches = _batches((32, 12))
  variables = model.init(jax.random.key(1), batches[0])
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4),
                                   rules=[("Dense_1", None)])
  new = result.variables
  assert [r.path for r in result.layers] == ["Dense_0"]
  assert result.skipped == [comq_jax.SkippedLayer("Dense_1", "nn.Dense", "rule 'Dense_1'")]
  x = jnp.concatenate(batches)
  direct = comq_jax.comq(bits=4).quantize_layer(variables["params"]["Dense_0"]["kernel"], x)
  np.testing.assert_allclose(new["params"]["Dense_0"]["kernel"],
                             direct.weights, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(new["params"]["Dense_1"]["kernel"],
                                variables["params"]["Dense_1"]["kernel"])
  # The mask marks exactly the quantized kernels, not the skipped one.
  assert result.quantized_mask() == {
      "Dense_0": {"kernel": True, "bias": False},
      "Dense_1": {"kernel": False, "bias": False}}


def test_rtn_method_rounds_each_kernel_on_the_same_grid():
  model = _MLP()
  batches = _batches((32, 12))
  variables = model.init(jax.random.key(1), batches[0])
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.rtn(bits=4))
  assert all(r.solver == comq_jax.rtn(bits=4) for r in result.layers)
  params = {path: {k: np.asarray(v) for k, v in leaf.items()}
            for path, leaf in variables["params"].items()}
  # Each layer's inputs in the FP model (inputs="fp"), computed here in float64.
  x = np.concatenate([np.asarray(b, np.float64) for b in batches])
  hidden = np.maximum(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"], 0.0)
  layer_inputs = {"Dense_0": x, "Dense_1": hidden}
  assert [r.path for r in result.layers] == ["Dense_0", "Dense_1"]
  for r in result.layers:
    kernel = params[r.path]["kernel"]
    expected = _numpy_rtn_asymmetric(kernel, 4)
    got = np.asarray(result.variables["params"][r.path]["kernel"])
    np.testing.assert_array_equal(got, expected)
    # The reported errors are ||X W - X Q||_F of the rounded kernel on the layer's
    # calibration inputs (RTN is its own baseline, so both match).
    direct = np.linalg.norm(layer_inputs[r.path] @ (kernel.astype(np.float64) - expected))
    assert direct > 0
    np.testing.assert_allclose(r.error, direct, rtol=1e-4)
    np.testing.assert_allclose(r.rtn_error, direct, rtol=1e-4)


def _numpy_rtn_asymmetric(w, bits):
  """Round-to-nearest on the official COMQ min-max grid of each column, in float32
  numpy: step (max - min) / (2^b - 1), z = round_half_even(min / step), levels
  (z + t) * step for t = 0..2^b-1 (comq.md); ties to the lower level."""
  w = np.asarray(w, np.float32)
  hi, lo = w.max(axis=0), w.min(axis=0)
  step = (hi - lo) / np.float32(2**bits - 1)
  z = np.round(lo / step)
  levels = (z[:, None] + np.arange(2**bits, dtype=np.float32)) * step[:, None]
  index = np.argmin(np.abs(w.T[:, :, None] - levels[:, None, :]), axis=-1)
  return np.take_along_axis(levels, index, axis=1).T


def test_size_report_counts_codes_and_grid_parameters():
  model = _MLP()
  batches = _batches((16, 12), n=1)
  variables = model.init(jax.random.key(1), batches[0])
  report = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4)).size_report()
  kernels, biases = 12 * 16 + 16 * 5, 16 + 5
  assert report.fp32_bytes == 4 * (kernels + biases)
  # 4-bit codes, a float32 scale and zero point per output channel (asymmetric
  # grid), f32 biases.
  packed = (math.ceil(4 * 12 * 16 / 8) + 8 * 16 + math.ceil(4 * 16 * 5 / 8)
            + 8 * 5 + 4 * biases)
  assert report.packed_bytes == packed
  assert report.codebook_bytes == pytest.approx(packed)  # log2(16) = 4 bits
  assert report.entropy_bytes is None
  assert report.quantized_fraction == pytest.approx(kernels / (kernels + biases))


def test_layers_are_logged(caplog):
  model = _MLP()
  batches = _batches((8, 12), n=1)
  variables = model.init(jax.random.key(1), batches[0])
  with caplog.at_level(logging.INFO, logger="comq_jax"):
    result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4),
                                     rules=[("Dense_0", None)])
  records = [r for r in caplog.records if r.name.startswith("comq_jax")]
  skips = [r for r in records if "left in float:" in r.getMessage()]
  assert [(r.levelno, r.getMessage()) for r in skips] == [
      (logging.INFO, "Dense_0 (nn.Dense) left in float: rule 'Dense_0'")]
  # The phase lines (plan, capture, solve, done) frame the per-layer records.
  phases = [r.getMessage().split(":")[0] for r in records
            if r.getMessage().split(":")[0] in ("plan", "capture", "solve", "done")]
  assert phases == ["plan", "capture", "solve", "done"]
  solves = [r for r in records if r not in skips and r.getMessage().startswith("COMQ ")]
  # One record per solved layer, and its numbers are the layer's: the method, its
  # position, the kernel shape, then the errors checked against a direct computation.
  assert len(solves) == 1 and len(records) == len(skips) + len(phases) + len(solves)
  method, index, total, path, shape, error, rtn_error, seconds = solves[0].args
  assert (method, index, total, path, tuple(shape)) == ("COMQ", 1, 1, "Dense_1", (16, 5))
  (report,) = result.layers
  assert (error, rtn_error, seconds) == (report.error, report.rtn_error, report.seconds)
  # Dense_0 stays in float, so Dense_1's inputs are the FP hidden activations.
  params = variables["params"]
  x = np.concatenate([np.asarray(b, np.float64) for b in batches])
  hidden = np.maximum(x @ np.asarray(params["Dense_0"]["kernel"], np.float64)
                      + np.asarray(params["Dense_0"]["bias"]), 0.0)
  w = np.asarray(params["Dense_1"]["kernel"], np.float64)
  q = np.asarray(result.variables["params"]["Dense_1"]["kernel"], np.float64)
  np.testing.assert_allclose(error, np.linalg.norm(hidden @ (w - q)), rtol=1e-4)
  rtn = _numpy_rtn_asymmetric(params["Dense_1"]["kernel"], 4).astype(np.float64)
  np.testing.assert_allclose(rtn_error, np.linalg.norm(hidden @ (w - rtn)), rtol=1e-4)
  assert f"error {error:.4g} (RTN {rtn_error:.4g})" in solves[0].getMessage()


def test_cnn_with_batchnorm_grouped_and_depthwise():
  model = _CNN()
  batches = _batches((4, 12, 12, 3))
  variables = model.init(jax.random.key(2), batches[0])
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4, iters=2),
                                   inputs="sequential", train=False)
  new = result.variables
  assert len(result.layers) == 4
  assert quant_core.layer_paths(model, variables, batches[0], train=False) == [
      r.path for r in result.layers]
  for r in result.layers:
    assert r.error <= r.rtn_error * (1 + 1e-6)
    kernel = new["params"][r.path]["kernel"]
    assert kernel.shape == r.shape
  assert "batch_stats" in new
  out = model.apply(new, batches[0], train=False)
  assert bool(jnp.all(jnp.isfinite(out)))


class _NoLinear(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm()(x)


def test_bad_arguments_raise():
  model = _MLP()
  batches = _batches((8, 12), n=1)
  variables = model.init(jax.random.key(1), batches[0])
  with pytest.raises(ValueError, match="inputs"):
    comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4), inputs="q")
  with pytest.raises(ValueError, match="empty"):
    comq_jax.quantize_model(model, variables, [], comq_jax.comq(bits=4))
  with pytest.raises(ValueError, match="bits"):
    comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=12))
  with pytest.raises(ValueError, match="solver must be built by comq_jax.comq"):
    comq_jax.quantize_model(model, variables, batches, "comq")
  no_linear = _NoLinear()
  with pytest.raises(ValueError, match="no linear layer to quantize"):
    comq_jax.quantize_model(no_linear, no_linear.init(jax.random.key(0), batches[0]), batches,
                            comq_jax.comq(bits=4))
