"""COMQ sharded over the suite's 4 fake CPU devices equals COMQ on one device, bitwise."""

import jax
import numpy as np
import pytest

import comq_jax
from experiments import models

_FIELDS = ("weights", "codes", "levels", "scale", "zero_point", "exponent", "error",
           "history")

# d_out 20 (fewer channels than a solver chunk: padded to one chunk per device) and
# 150 (three chunks on one device, padded to four split over the mesh); d_in 72 with
# groups of 32 leaves a ragged last group.
_LAYER_CASES = {
    "channel_asymmetric": dict(d_out=150, granularity="channel", iters=2,
                               scale_update=True),
    "group_asymmetric": dict(d_out=20, granularity="group", group_size=32, iters=2,
                             scale_update=True, order="cyclic"),
    "layer_pow2": dict(d_out=20, granularity="layer", grid="pow2", iters=2,
                       scale_update=True),
    "layer_symmetric_gptq_init": dict(d_out=150, granularity="layer", grid="symmetric",
                                      init="gptq"),
}


def _mesh(shape=(4,), names=("batch",)):
  return jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(shape), names)


@pytest.mark.parametrize("case", sorted(_LAYER_CASES))
def test_quantize_layer_on_a_mesh_equals_one_device(case):
  options = dict(_LAYER_CASES[case])
  d_out = options.pop("d_out")
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((256, 72)) * rng.uniform(0.2, 3.0, 72)).astype(np.float32)
  w = rng.normal(0.0, 0.05, (72, d_out)).astype(np.float32)
  single = comq_jax.quantize_layer(w, x, bits=4, **options)
  sharded = comq_jax.quantize_layer(w, x, bits=4, mesh=_mesh(), **options)
  for field in _FIELDS:
    np.testing.assert_array_equal(getattr(sharded, field), getattr(single, field),
                                  err_msg=field)


def _digits_cnn():
  model = models.SmallCNN()
  # Batches of 8, 8 and 4 examples: with microbatches of 2 on 4 devices the last
  # step has two idle devices.
  batches = [jax.random.normal(jax.random.key(i), (n, 8, 8, 1))
             for i, n in enumerate((8, 8, 4))]
  variables = model.init(jax.random.key(9), batches[0], train=False)
  return model, variables, batches


def test_quantize_model_on_a_mesh_equals_one_device():
  model, variables, batches = _digits_cnn()
  options = dict(bits=4, granularity="layer", scale_update=True, microbatch=2,
                 train=False)
  single = comq_jax.quantize_model(model, variables, batches, **options)
  sharded = comq_jax.quantize_model(model, variables, batches, mesh=_mesh(), **options)
  jax.tree.map(np.testing.assert_array_equal, sharded.variables, single.variables)
  assert [r.path for r in sharded.layers] == ["conv1", "conv2", "conv3", "fc"]
  assert ([(r.error, r.rtn_error) for r in sharded.layers]
          == [(r.error, r.rtn_error) for r in single.layers])


def test_layer_grams_on_a_two_axis_mesh_equal_one_device():
  # Batches split over the 2 devices of "batch", replicated over "model".
  model, variables, batches = _digits_cnn()
  single = comq_jax.layer_grams(model, variables, batches, microbatch=2, train=False)
  sharded = comq_jax.layer_grams(model, variables, batches, microbatch=2,
                                 mesh=_mesh((2, 2), ("batch", "model")), train=False)
  assert list(sharded) == list(single)
  for path, accumulated in single.items():
    np.testing.assert_array_equal(sharded[path].gram, accumulated.gram, err_msg=path)
    assert float(sharded[path].count) == float(accumulated.count)


def test_bad_mesh_or_microbatch_raises():
  model, variables, batches = _digits_cnn()
  w = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    comq_jax.quantize_layer(w, np.ones((4, 8), np.float32), bits=4, mesh=jax.devices())
  with pytest.raises(ValueError, match="axis named 'batch'.*'data'"):
    comq_jax.quantize_model(model, variables, batches, bits=4, microbatch=2,
                            mesh=_mesh(names=("data",)), train=False)
  with pytest.raises(ValueError, match="pass microbatch"):
    comq_jax.quantize_model(model, variables, batches, bits=4, mesh=_mesh(), train=False)
  with pytest.raises(ValueError, match="microbatch must be None or an integer >= 1"):
    comq_jax.layer_grams(model, variables, batches, microbatch=0, train=False)
  with pytest.raises(ValueError, match="batch of 8 examples does not split into "
                                       "microbatches of 3"):
    comq_jax.layer_grams(model, variables, batches, microbatch=3, mesh=_mesh(),
                         train=False)
