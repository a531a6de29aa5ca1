"""COMQ and round-to-nearest through train_and_evaluate on digits (one FP epoch each)."""

import math
import os

import jax
import numpy as np
import pytest

import comq_jax
import configs
from experiments import input_pipeline
from experiments import report
from experiments import models
from experiments import tasks
from experiments import train
from experiments.methods import post_training
import inq_jax


KERNELS = ("conv1", "conv2", "conv3", "fc")  # SmallCNN's Conv/Dense layers, forward order


def tiny_config(name, **overrides):
  """One FP epoch (42 steps, ~0.7 test accuracy); COMQ on 64 calibration images."""
  fields = {"fp.num_epochs": 1, "fp.lr_decay_epoch": 1, "checkpoint_every_steps": 100,
            "log_every_steps": 50, "num_devices": 1,
            "calibration.num_examples": 64, "calibration.batch_size": 32}
  fields.update(overrides)
  return configs.apply_overrides(configs.get_config(name, "digits"), fields)


def final_params(workdir):
  state, _ = train.latest_checkpoint(workdir)
  return state["variables"]["params"], state["variables"]["batch_stats"]


def kernel_matrices(params):
  """name -> (kh*kw*cin, cout) matrix of each kernel: one column per output channel."""
  return {name: np.asarray(params[name]["kernel"]).reshape(-1, params[name]["kernel"].shape[-1])
          for name in KERNELS}


def expected_grid_bytes(params, batch_stats, bits, bytes_per_channel):
  """The documented size formula, written out: codes + per-channel grid parameters."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path({"params": params,
                                                         "batch_stats": batch_stats}):
    if path[-1].key == "kernel":
      total += math.ceil(bits * leaf.size / 8) + bytes_per_channel * leaf.shape[-1]
    else:
      total += 4 * leaf.size
  return total


@pytest.fixture(scope="module")
def comq_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("comq"))
  return train.train_and_evaluate(tiny_config("comq_4bit"), workdir), workdir


@pytest.mark.integration
def test_comq_results_keys_and_accuracy(comq_run):
  results, workdir = comq_run
  # Every quantized run writes its packed model file, well under the FP32 file.
  path = os.path.join(workdir, train.PACKED_MODEL_FILE)
  assert os.path.getsize(path) == results["packed_file_bytes"]
  assert results["packed_file_bytes"] < results["fp32_file_bytes"] / 3
  for key in ("fp_accuracy", "final_accuracy", "bits", "method", "config_name", "seed",
              "packed_bytes", "fp32_bytes", "codebook_bytes", "layers", "packed_accuracy",
              "codebook_fraction", "portion_accuracies"):
    assert key in results
  assert (results["method"], results["bits"], results["config_name"]) == ("comq", 4,
                                                                          "comq_4bit")
  assert results["codebook_fraction"] is None and results["packed_accuracy"] is None
  assert results["portion_accuracies"] == []
  assert 0.5 < results["fp_accuracy"] <= 1.0
  # 4-bit per-channel COMQ of a 0.7-accurate net: within 5 points of FP.
  assert results["final_accuracy"] >= results["fp_accuracy"] - 0.05


@pytest.mark.integration
def test_comq_layers_beat_round_to_nearest(comq_run):
  results, _ = comq_run
  layers = results["layers"]
  assert [layer["path"] for layer in layers] == list(KERNELS)
  assert layers[0]["shape"] == [3, 3, 1, 16] and layers[-1]["shape"] == [64, 10]
  for layer in layers:
    assert layer["bits"] == 4 and layer["seconds"] >= 0
    assert 0 < layer["error"] <= layer["rtn_error"], layer


@pytest.mark.integration
def test_comq_kernels_on_4bit_grid_and_sizes(comq_run):
  results, workdir = comq_run
  params, batch_stats = final_params(workdir)
  for name, matrix in kernel_matrices(params).items():
    levels = max(len(np.unique(matrix[:, j])) for j in range(matrix.shape[1]))
    assert levels <= 2**4, name
  # Asymmetric grid: float32 scale + zero point per output channel.
  assert results["packed_bytes"] == expected_grid_bytes(params, batch_stats, 4, 8)
  num_values = sum(leaf.size for leaf in jax.tree.leaves((params, batch_stats)))
  assert results["fp32_bytes"] == 4 * num_values
  assert results["codebook_bytes"] <= results["packed_bytes"] < results["fp32_bytes"] / 5
  table = report.format_results(results)
  assert "Final 4-bit COMQ test accuracy" in table and "COMQ/RTN" in table
  assert all(name in table for name in KERNELS)


@pytest.mark.integration
def test_comq_skip_first_last_keeps_them_float(tmp_path):
  # conv2 and conv3 quantized as blocks of one layer each (the config's blocks reach
  # quantize_model): inputs from the FP model either way.
  config = tiny_config("comq_2bit", **{"comq.skip_first_last": True,
                                       "calibration.num_examples": 32,
                                       "comq.blocks": "conv[23]"})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert [layer["path"] for layer in results["layers"]] == ["conv2", "conv3"]
  params, batch_stats = final_params(str(tmp_path))
  matrices = kernel_matrices(params)
  assert len(np.unique(matrices["conv1"][:, 0])) == 9  # float: 9 distinct weights
  assert len(np.unique(matrices["conv2"][:, 0])) <= 4
  expected = expected_grid_bytes(params, batch_stats, 2, 8)
  # conv1 and fc stay float32: 4 bytes per weight instead of codes and grid parameters.
  for name in ("conv1", "fc"):
    kernel = params[name]["kernel"]
    expected += 4 * kernel.size - math.ceil(2 * kernel.size / 8) - 8 * kernel.shape[-1]
  assert results["packed_bytes"] == expected


@pytest.mark.integration
def test_comq_on_the_job_mesh_equals_one_device(tmp_path, comq_run, monkeypatch):
  # With calibration.microbatch set, the job's mesh (the suite's 4 CPU devices) takes
  # the Grams and the solves; one device with the same microbatch gives the same bits.
  # Both start from the module run's final variables, so that FP training (whose sums
  # depend on the device count) is not part of the comparison.
  fp = train.final_variables(comq_run[1])
  results, params, meshes = {}, {}, []
  quantize_model = comq_jax.quantize_model

  def spy(*args, **kwargs):
    meshes.append(kwargs["mesh"].devices.size)
    return quantize_model(*args, **kwargs)

  monkeypatch.setattr(comq_jax, "quantize_model", spy)
  for devices in (1, 4):
    workdir = str(tmp_path / f"devices{devices}")
    config = tiny_config("comq_4bit", **{"num_devices": devices,
                                         "calibration.microbatch": 8})
    results[devices] = train.train_and_evaluate(config, workdir, fp_variables=fp)
    params[devices] = train.final_variables(workdir)["params"]
  assert meshes == [1, 4]
  jax.tree.map(np.testing.assert_array_equal, params[4], params[1])
  assert ([layer["error"] for layer in results[4]["layers"]]
          == [layer["error"] for layer in results[1]["layers"]])
  with pytest.raises(ValueError, match="calibration.microbatch=5 must divide "
                                       "calibration.batch_size=32"):
    train.train_and_evaluate(tiny_config("comq_4bit", **{"calibration.microbatch": 5}),
                             str(tmp_path / "bad"))


def test_calibration_size_must_divide_into_batches():
  data = input_pipeline.DigitsData(test_size=0.25, split_seed=0)
  task = tasks.ImageClassification
  with pytest.raises(ValueError, match="multiple of calibration.batch_size=32"):
    post_training.calibration_inputs(tiny_config("comq_4bit", **{
        "calibration.num_examples": 40}), task, data, (0, 1, 0))
  with pytest.raises(ValueError, match="exceeds the 1347 training examples"):
    post_training.calibration_inputs(tiny_config("comq_4bit", **{
        "calibration.num_examples": 1376}), task, data, (0, 1, 0))


@pytest.mark.integration
def test_rtn_pow2_weights_are_in_the_inq_codebook(tmp_path):
  config = tiny_config("rtn_3bit", **{"rtn.grid": "pow2"})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert (results["method"], results["bits"]) == ("rtn", 3)
  # Round-to-nearest measures its error on the calibration images too.
  assert [layer["path"] for layer in results["layers"]] == list(KERNELS)
  assert all(layer["error"] == layer["rtn_error"] > 0 for layer in results["layers"])
  # 3-bit power-of-two rounding of a 1-epoch net with no data: 0.44-0.68 at seeds 0-2
  # (measured with this config), against 0.61-0.77 in FP; chance is 0.1.
  assert 0.15 < results["final_accuracy"] < results["fp_accuracy"]
  params, batch_stats = final_params(str(tmp_path))
  for name, matrix in kernel_matrices(params).items():
    # Per output channel, {0, ±2^n2, ..., ±2^n1} with n1 from the channel's largest |w|.
    n1, _ = inq_jax.pow2_exponents(np.abs(matrix).max(axis=0), 3)
    assert np.all(inq_jax.in_codebook(matrix, 3, n1[None, :])), name
    assert max(len(np.unique(np.abs(matrix[:, j]))) for j in range(matrix.shape[1])) <= 3
  # pow2: one int32 n1 per output channel beside the codes.
  assert results["packed_bytes"] == expected_grid_bytes(params, batch_stats, 3, 4)
  table = report.format_results(results)
  assert "Final 3-bit RTN test accuracy" in table
  assert all(name in table for name in KERNELS)


@pytest.mark.integration
def test_eval_packed_needs_a_quantization_method(tmp_path):
  with pytest.raises(ValueError, match=r"eval_packed needs a quantization method "
                     r"\(inq, comq, gptq, rtn\), got 'fp'"):
    train.train_and_evaluate(tiny_config("fp", eval_packed=True), str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.integration
def test_digits_layers_more_sweeps_and_scale_updates_never_hurt(tmp_path):
  """On a trained digits CNN, per layer: COMQ <= RTN, K=3 <= K=1, scale update <= none."""
  train.train_and_evaluate(tiny_config("fp"), str(tmp_path))
  params, batch_stats = final_params(str(tmp_path))
  variables = {"params": params, "batch_stats": batch_stats}
  data = input_pipeline.DigitsData(test_size=0.25, split_seed=0)
  images = [data.train_images[start:start + 64] for start in (0, 64)]
  model = models.create_model("SmallCNN", 10)
  errors = {}
  for name, options in (("k1", {"iters": 1}), ("k3", {"iters": 3}),
                        ("k3_scale", {"iters": 3, "scale_update": True})):
    reports = comq_jax.quantize_model(model, variables, images, comq_jax.comq(bits=3, **options),
                                      train=False).layers
    assert [r.path for r in reports] == list(KERNELS)
    errors[name] = reports
  for k1, k3, scaled in zip(errors["k1"], errors["k3"], errors["k3_scale"], strict=True):
    tolerance = 1e-6 * k1.rtn_error
    assert k1.error <= k1.rtn_error + tolerance, k1
    assert k3.error <= k1.error + tolerance, (k3, k1)
    assert scaled.error <= k3.error + tolerance, (scaled, k3)


@pytest.mark.integration
@pytest.mark.parametrize("sensitivity", ["rtn", "fisher"])
def test_mixed_precision_budget_through_the_job(tmp_path, sensitivity):
  # A budget between uniform 2 and 4 bits: the layers take several widths, the packed
  # file holds each at its own width, and the sizes follow from the chosen widths. With
  # "fisher", the per-example Fisher of the CNN's loss (batch statistics in evaluation
  # mode) weighs the rounding errors.
  config = tiny_config("rtn_4bit", **{"rtn.bit_budget": 4.0, "rtn.bit_choices": (2, 4, 8),
                                      "rtn.sensitivity": sensitivity,
                                      "calibration.num_examples": 32})
  results = train.train_and_evaluate(config, str(tmp_path))
  chosen = {layer["path"]: layer["bits"] for layer in results["layers"]}
  _, progress = train.latest_checkpoint(str(tmp_path))
  allocation = progress["records"]["rtn"]["allocation"]
  assert allocation["bits"] == chosen and len(set(chosen.values())) > 1, chosen
  assert allocation["average_bits"] <= 4.0
  params, batch_stats = final_params(str(tmp_path))
  expected = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path({"params": params,
                                                         "batch_stats": batch_stats}):
    name = path[-2].key
    if path[-1].key == "kernel":
      expected += math.ceil(chosen[name] * leaf.size / 8) + 8 * leaf.shape[-1]
    else:
      expected += 4 * leaf.size
  assert results["packed_bytes"] == expected
  kernel_bits = sum(8 * (math.ceil(chosen[name] * params[name]["kernel"].size / 8)
                         + 8 * params[name]["kernel"].shape[-1]) for name in KERNELS)
  weights = sum(params[name]["kernel"].size for name in KERNELS)
  np.testing.assert_allclose(allocation["average_bits"], kernel_bits / weights, rtol=1e-9)
  with open(os.path.join(str(tmp_path), train.PACKED_MODEL_FILE), "rb") as file:
    assert len(file.read()) == results["packed_file_bytes"]


def test_mixed_precision_bad_settings_are_refused(tmp_path):
  for fields, message in (
      ({"rtn.bit_budget": 3.0, "rtn.sensitivity": "hessian"}, "rtn.sensitivity must be"),
      ({"rtn.bit_budget": 3.0, "rtn.bit_choices": (2, 99)}, "rtn.bit_choices"),
      ({"rtn.bit_budget": 3.0, "rtn.inputs": "sequential"}, "needs rtn.inputs='fp'")):
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(tiny_config("rtn_4bit", **fields), str(tmp_path))


def test_mixed_precision_packing_gathers_kernels_under_nnx_integer_keys():
  # NNX params hold list entries under integer keys ("layers/0" is layers[0]).
  old = {"params": {"layers": {0: {"proj": {"kernel": "float", "bias": "b"}},
                               1: {"proj": {"kernel": "float"}}}}}
  packed = {"params": {"layers": {0: {"proj": {"kernel": "packed-2"}},
                                  1: {"proj": {"kernel": "packed-4"}}}}}
  merged = post_training._with_kernels(old, packed, ["layers/1/proj"])
  assert merged["params"]["layers"][1]["proj"]["kernel"] == "packed-4"
  assert merged["params"]["layers"][0]["proj"] == {"kernel": "float", "bias": "b"}
  assert old["params"]["layers"][1]["proj"]["kernel"] == "float"  # not changed in place
