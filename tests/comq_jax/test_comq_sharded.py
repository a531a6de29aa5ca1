"""COMQ sharded over the suite's 4 fake CPU devices, or over 2 processes x 2 devices,
equals COMQ on one device, bitwise."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import comq_jax
import quant_core
from experiments import models
from tests.experiments import test_distributed

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
  single = comq_jax.comq(bits=4, **options).quantize_layer(w, x)
  sharded = comq_jax.comq(bits=4, **options).quantize_layer(w, x, mesh=_mesh())
  for field in _FIELDS:
    np.testing.assert_array_equal(getattr(sharded, field), getattr(single, field),
                                  err_msg=field)


_SOLVER = comq_jax.comq(bits=4, granularity="layer", scale_update=True)
_MODEL_OPTIONS = dict(microbatch=2, train=False)


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
  single = comq_jax.quantize_model(model, variables, batches, _SOLVER, **_MODEL_OPTIONS)
  sharded = comq_jax.quantize_model(model, variables, batches, _SOLVER, mesh=_mesh(),
                                    **_MODEL_OPTIONS)
  jax.tree.map(np.testing.assert_array_equal, sharded.variables, single.variables)
  assert [r.path for r in sharded.layers] == ["conv1", "conv2", "conv3", "fc"]
  assert ([(r.error, r.rtn_error) for r in sharded.layers]
          == [(r.error, r.rtn_error) for r in single.layers])


def _quantize_in_process(out, port, num_processes, process_id):
  """One process of a multi-process run: the digits CNN quantized on a mesh over
  every process's devices; process 0 saves the kernels to ``out``."""
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  model, variables, batches = _digits_cnn()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  result = comq_jax.quantize_model(model, variables, batches, _SOLVER, mesh=mesh, **_MODEL_OPTIONS)
  if jax.process_index() == 0:
    np.savez(out, **{name: np.asarray(result.variables["params"][name]["kernel"])
                     for name in ("conv1", "conv2", "conv3", "fc")})


@pytest.mark.integration
def test_quantize_model_over_two_processes_equals_one_device(tmp_path):
  # Calibration batches split over 2 processes x 2 CPU devices (gloo collectives).
  model, variables, batches = _digits_cnn()
  single = comq_jax.quantize_model(model, variables, batches, _SOLVER, **_MODEL_OPTIONS)
  out, port = tmp_path / "kernels.npz", test_distributed.free_port()
  env = dict(os.environ, PYTHONPATH=test_distributed.REPO, JAX_PLATFORMS="cpu",
             JAX_NUM_CPU_DEVICES="2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")  # as conftest.py, for bitwise equality
  processes = [subprocess.Popen(
      [sys.executable, "-m", "tests.comq_jax.test_comq_sharded", str(out), str(port), "2", str(i)],
      cwd=test_distributed.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  try:
    for process in processes:
      log = process.communicate(timeout=test_distributed.TIMEOUT_S)[0]
      assert process.returncode == 0, log[-5000:]
  finally:
    for process in processes:  # a process left waiting on a failed peer
      if process.poll() is None:
        process.kill()
        process.wait()
  kernels = np.load(out)
  for name in ("conv1", "conv2", "conv3", "fc"):
    np.testing.assert_array_equal(kernels[name],
                                  single.variables["params"][name]["kernel"], err_msg=name)


def test_layer_grams_on_a_two_axis_mesh_equal_one_device():
  # Batches split over the 2 devices of "batch", replicated over "model".
  model, variables, batches = _digits_cnn()
  single = quant_core.layer_grams(model, variables, batches, microbatch=2, train=False)
  sharded = quant_core.layer_grams(model, variables, batches, microbatch=2,
                                 mesh=_mesh((2, 2), ("batch", "model")), train=False)
  assert list(sharded) == list(single)
  for path, accumulated in single.items():
    np.testing.assert_array_equal(sharded[path].gram, accumulated.gram, err_msg=path)
    assert float(sharded[path].count) == float(accumulated.count)


def test_bad_mesh_or_microbatch_raises():
  model, variables, batches = _digits_cnn()
  w = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    comq_jax.comq(bits=4).quantize_layer(w, np.ones((4, 8), np.float32), mesh=jax.devices())
  with pytest.raises(ValueError, match="axis named 'batch'.*'data'"):
    comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4), microbatch=2,
                            mesh=_mesh(names=("data",)), train=False)
  with pytest.raises(ValueError, match="pass microbatch"):
    comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4), mesh=_mesh(),
                            train=False)
  with pytest.raises(ValueError, match="microbatch must be None or an integer >= 1"):
    quant_core.layer_grams(model, variables, batches, microbatch=0, train=False)
  with pytest.raises(ValueError, match="batch of 8 examples does not split into "
                                       "microbatches of 3"):
    quant_core.layer_grams(model, variables, batches, microbatch=3, mesh=_mesh(),
                         train=False)


if __name__ == "__main__":
  _quantize_in_process(*sys.argv[1:])
