"""Progress of long per-layer work: phase and per-layer log lines, and the bar."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import inq_jax
from experiments.models import cnn
from experiments.models import vit
from quant_core import deploy


def _images(shape, count=2):
  return [np.random.default_rng(i).normal(size=shape).astype(np.float32)
          for i in range(count)]


def _messages(caplog, logger):
  return [record.getMessage() for record in caplog.records if record.name == logger]


MODELS = {
    "digits_cnn": (lambda: cnn.SmallCNN(), (16, 8, 8, 1)),
    "vit": (lambda: vit.VisionTransformer(num_classes=10, image_size=16, patch_size=4,
                                          width=32, depth=2, num_heads=2), (4, 16, 16, 3)),
}


@pytest.mark.parametrize("name", MODELS)
def test_quantize_model_logs_phases_and_layers_and_shows_a_bar(name, caplog, capsys):
  make, shape = MODELS[name]
  model = make()
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
  with caplog.at_level(logging.INFO, logger="comq_jax.driver"):
    result = comq_jax.quantize_model(model, variables, _images(shape),
                                     comq_jax.comq(bits=4), progress=True, train=False)
  messages = _messages(caplog, "comq_jax.driver")
  layers = len(result.layers)
  assert layers >= 4
  assert messages[0].startswith(f"plan: {layers} layers to quantize, ")
  assert messages[1].startswith(f"capture: Grams of {layers} layers in ")
  assert messages[2] == f"solve: {layers} layers"
  per_layer = messages[3:3 + layers]
  # One line per layer, in order, with its error and RTN's.
  assert per_layer == [
      f"COMQ {i + 1}/{layers} {report.path} {report.shape}: error {report.error:.4g} "
      f"(RTN {report.rtn_error:.4g}), {report.seconds:.2f}s"
      for i, report in enumerate(result.layers)]
  assert messages[-1].startswith(f"done: {layers} layers quantized, ")
  bar = capsys.readouterr().err
  assert f"{layers}/{layers}" in bar and "COMQ" in bar and result.layers[-1].path in bar


def test_no_bar_without_progress(caplog, capsys):
  make, shape = MODELS["digits_cnn"]
  model = make()
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
  with caplog.at_level(logging.INFO, logger="comq_jax.driver"):
    comq_jax.quantize_model(model, variables, _images(shape), comq_jax.rtn(bits=4),
                            train=False)
  assert "layer/s" not in capsys.readouterr().err
  assert len(_messages(caplog, "comq_jax.driver")) == 4 + 4  # phases and layers


def test_packers_log_each_layer(caplog, capsys):
  make, shape = MODELS["digits_cnn"]
  model = make()
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
  result = comq_jax.quantize_model(model, variables, _images(shape), comq_jax.rtn(bits=4),
                                   train=False)
  paths = [report.path for report in result.layers]
  with caplog.at_level(logging.INFO, logger="quant_core.deploy.inference"):
    deploy.pack_quantization(result, progress=True)
    deploy.pack_layers(result.variables, model, jnp.zeros(shape), paths, bits=4,
                       grid="asymmetric", granularity="channel", train=False)
  expected = [f"packed {i + 1}/4 {path}" for i, path in enumerate(paths)]
  assert _messages(caplog, "quant_core.deploy.inference") == expected + expected
  assert "packing" in capsys.readouterr().err


def test_inq_pack_model_logs_each_layer(caplog):
  make, shape = MODELS["digits_cnn"]
  model = make()
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
  quantizer = inq_jax.inq(bits=5)
  state = quantizer.init(variables["params"])
  params, state = quantizer.step(variables["params"], state, 1.0)
  with caplog.at_level(logging.INFO, logger="inq_jax.packing"):
    inq_jax.pack_model(model, dict(variables, params=params), state, jnp.zeros(shape),
                       train=False)
  assert _messages(caplog, "inq_jax.packing") == [
      f"packed {name}" for name in ("conv1", "conv2", "conv3", "fc")]


@pytest.mark.parametrize("progress", ["yes", 1, None])
def test_progress_must_be_a_bool(progress):
  with pytest.raises(ValueError, match="progress must be True or False"):
    comq_jax.quantize_model(lambda v, x: x, {"params": {}}, [np.zeros((1, 2))],
                            comq_jax.comq(bits=4), progress=progress)
