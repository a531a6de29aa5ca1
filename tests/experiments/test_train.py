"""End-to-end runs of train_and_evaluate on digits: smoke, resume, data parallel, NaN stop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import quant_core
from experiments import compare_runs
from experiments import input_pipeline
from experiments import methods
from experiments import models
from experiments import train
from experiments.methods import base
from tests.experiments import killed_jobs

# Integration: every test runs train_and_evaluate (one in a subprocess).
pytestmark = pytest.mark.integration


def tiny_config(name="inq_5bit", **overrides):
  """One FP epoch, one epoch per INQ step, schedule 0.5 -> 0.75 -> 1 (42 steps/epoch)."""
  fields = {"fp.num_epochs": 1, "inq.epochs_per_step": 1, "inq.lr_decay_epoch": 1,
            "fp.lr_decay_epoch": 1, "checkpoint_every_steps": 10, "log_every_steps": 10,
            "num_devices": 1}
  if name != "fp":
    fields["inq.schedule"] = (0.5, 0.75, 1.0)
  fields.update(overrides)
  return configs.apply_overrides(configs.get_config(name, "digits"), fields)


def test_inq_run_writes_results_metrics_and_config(tmp_path):
  workdir = str(tmp_path)
  results = train.train_and_evaluate(tiny_config(eval_packed=True), workdir)
  for key in ("fp_accuracy", "final_accuracy", "packed_accuracy", "codebook_fraction",
              "packed_bytes", "fp32_bytes", "codebook_bytes", "entropy_bytes",
              "portion_accuracies", "config_name", "bits", "method", "seed"):
    assert key in results
  assert results["codebook_fraction"] == 1.0
  # One FP epoch reaches 0.61-0.77 and the three short INQ steps (three more epochs of
  # training) 0.96 at seeds 0-2 (measured with this config); chance is 0.1.
  assert 0.5 < results["fp_accuracy"] <= 1.0
  assert 0.9 < results["final_accuracy"] <= 1.0
  # The packed codes through the shift kernel give the same predictions: the kernel sums
  # the same power-of-two products in float32, only possibly in another order, which
  # could flip an argmax with a near-tie (allowed: one of the 450 test images).
  assert abs(results["packed_accuracy"] - results["final_accuracy"]) <= 1 / 450 + 1e-12
  assert (os.path.getsize(os.path.join(workdir, train.PACKED_MODEL_FILE))
          == results["packed_file_bytes"] < results["fp32_file_bytes"] / 2)
  assert [p["portion"] for p in results["portion_accuracies"]] == [0.5, 0.75, 1.0]
  # Sizes: size_report of the packed model, as written to the packed model file. 5-bit
  # codes take one byte each, and K is padded to the kernel's k_tile, so the real packed
  # model is only ~2.7x smaller than FP32 on this small CNN; log2(17) bits per weight
  # would give ~7x.
  state, _ = train.latest_checkpoint(workdir)
  written = quant_core.deploy.load_packed(os.path.join(workdir, train.PACKED_MODEL_FILE),
                                       like=state["variables"])
  assert results["packed_bytes"] == quant_core.deploy.size_report(written).packed_bytes
  num_values = sum(leaf.size for leaf in jax.tree.leaves(state["variables"]))
  assert results["fp32_bytes"] == 4 * num_values
  assert results["packed_bytes"] < results["fp32_bytes"] / 2
  assert results["entropy_bytes"] <= results["codebook_bytes"] < results["fp32_bytes"] / 6
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["inq"]["bits"] == 5
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r["type"] == "eval"]
  assert [r["phase_name"] for r in evals] == ["fp", "inq_0.5", "inq_0.75", "inq_1"]
  assert all(np.isfinite(r["loss"]) for r in records if r["type"] == "train")
  frozen = state["method"]["frozen"]
  assert all(np.all(f) for f in (frozen["conv1"]["kernel"], frozen["fc"]["kernel"]))
  assert not np.any(frozen["fc"]["bias"])


# SmallCNN's variables, counted by hand from experiments/models/cnn.py: bias-free 3x3
# convs 9*1*16 + 9*16*32 + 9*32*64 = 23184, three BatchNorms with scale, bias, mean and
# var 4*(16+32+64) = 448, the dense head 64*10 + 10 = 650; 24282 in all.
SMALL_CNN_VALUES = 24282


def test_fp_method_reports_full_precision(tmp_path):
  results = train.train_and_evaluate(tiny_config("fp"), str(tmp_path))
  assert results["bits"] == 32 and results["codebook_fraction"] is None
  # Nothing is packed: float32 storage of every variable, batch statistics included.
  assert results["fp32_bytes"] == results["packed_bytes"] == 4 * SMALL_CNN_VALUES
  assert results["packed_file_bytes"] is None and results["portion_accuracies"] == []
  state, _ = train.latest_checkpoint(str(tmp_path))
  assert all(np.asarray(leaf).dtype == np.float32
             for leaf in jax.tree.leaves(state["variables"]))
  # Both accuracies are those of the final weights, evaluated here independently of
  # train.evaluate (one phase: the FP model is the final model).
  config = tiny_config("fp")
  dataset = input_pipeline.create_dataset(config)
  model = models.create_model(config.model.name, config.model.num_classes)
  logits = model.apply(state["variables"], dataset.test_images, train=False)
  correct = int(np.sum(np.argmax(logits, -1) == dataset.test_labels))
  assert len(dataset.test_labels) == 450
  assert results["final_accuracy"] == results["fp_accuracy"] == correct / 450
  assert results["fp_accuracy"] > 0.5  # chance is 0.1: the run did train


def test_resume_mid_inq_step_is_bitwise_identical(tmp_path):
  config = tiny_config()
  reference = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  interrupted_dir = str(tmp_path / "interrupted")
  # 42 FP + 42 (portion 0.5) + 20 steps into portion 0.75, between two checkpoints.
  stopping = configs.apply_overrides(config, {"stop_after_steps": 104})
  assert train.train_and_evaluate(stopping, interrupted_dir) is None
  _, progress = train.latest_checkpoint(interrupted_dir)
  assert (progress["phase"], progress["step_in_phase"]) == (2, 20)
  resumed = train.train_and_evaluate(config, interrupted_dir)
  # Equal but for the wall-clock seconds of each phase.
  assert compare_runs.results_differences(resumed, reference) == []
  expected, _ = train.latest_checkpoint(str(tmp_path / "uninterrupted"))
  actual, _ = train.latest_checkpoint(interrupted_dir)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


# tiny_config() as command-line overrides, logging and checkpointing every 2 steps so
# that a kill can be timed from metrics.jsonl and lands well after a finished checkpoint.
TINY_FLAGS = ["--config=inq_5bit", "--config.fp.num_epochs=1", "--config.inq.epochs_per_step=1",
              "--config.inq.lr_decay_epoch=1", "--config.fp.lr_decay_epoch=1",
              "--config.checkpoint_every_steps=2", "--config.log_every_steps=2",
              "--config.num_devices=1", "--config.inq.schedule=(0.5,0.75,1.0)"]


# Slow: the language-model job's SIGKILL test (tests/experiments/test_llm_job.py) runs the
# same loop and Orbax manager in the default suite, and the stop-and-resume test above
# checks this job's resumption there.
@pytest.mark.slow
def test_sigkill_during_the_75_percent_step_then_rerun_matches_uninterrupted(tmp_path):
  # Killed 20 steps into the 75% step: checkpoints from inside it exist by then (an
  # Orbax save runs while later steps train, so the newest one may be unfinished).
  rerun, _ = killed_jobs.kill_rerun_and_compare("experiments.digits", TINY_FLAGS, tmp_path,
                                                "inq_0.75", 20)
  # The rerun resumed inside the 75% step: it logged no FP or 50% training again.
  assert rerun[0]["phase_name"] == "inq_0.75" and rerun[0]["step_in_phase"] > 2


def test_resuming_with_another_config_is_an_error(tmp_path):
  train.train_and_evaluate(tiny_config("fp"), str(tmp_path))
  with pytest.raises(ValueError, match="seed"):
    train.train_and_evaluate(tiny_config("fp", seed=1), str(tmp_path))


def test_four_devices_match_one_device(tmp_path):
  assert len(jax.local_devices()) == 4
  # A small learning rate: at 0.05, 42 SGD steps amplify reduction-order rounding to ~1%.
  small_lr = {"fp.learning_rate": 0.005}
  single = train.train_and_evaluate(tiny_config("fp", num_devices=1, **small_lr),
                                    str(tmp_path / "one"))
  sharded = train.train_and_evaluate(tiny_config("fp", num_devices=4, **small_lr),
                                     str(tmp_path / "four"))
  assert abs(single["fp_accuracy"] - sharded["fp_accuracy"]) <= 1 / 450 + 1e-12
  state_one, _ = train.latest_checkpoint(str(tmp_path / "one"))
  state_four, _ = train.latest_checkpoint(str(tmp_path / "four"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-5, atol=1e-6),
               state_four["variables"], state_one["variables"])


def test_batch_not_divisible_by_devices_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="batch_size=30"):
    train.train_and_evaluate(tiny_config("fp", num_devices=4, batch_size=30), str(tmp_path))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config("fp", **{"fp.learning_rate": 1e12, "checkpoint_every_steps": 1,
                                "log_every_steps": 1})
  with pytest.raises(FloatingPointError,
                     match=r"Non-finite loss or parameters at training step \d+"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "results.json"))
  state, progress = train.latest_checkpoint(str(tmp_path))
  assert progress["global_step"] >= 1
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state["variables"]))


class ZeroMantissa(base.Method):
  """A toy method for the registry test: every kernel rounded to a signed power of two
  by truncating its float32 mantissa (zero bits of mantissa); no data, no training."""
  name = "zero_mantissa"
  label = "Zero-mantissa"

  def bits(self, config):
    return 9  # sign and 8 exponent bits

  def phases(self, config, steps_per_epoch):
    return [base.Phase("zero_mantissa", 0, None)]

  def enter(self, phase, state, context):
    def truncate(path, leaf):
      if not quant_core.default_quantizable(path, leaf):
        return leaf
      bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32) & jnp.uint32(0xFF800000)
      return jax.lax.bitcast_convert_type(bits, jnp.float32)
    params = jax.tree_util.tree_map_with_path(truncate, state["variables"]["params"])
    return dict(state, variables=dict(state["variables"], params=params)), {"kernels": 4}


def test_a_method_registered_from_a_test_runs_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.REGISTRY, "zero_mantissa", ZeroMantissa())
  results = train.train_and_evaluate(tiny_config("fp", method="zero_mantissa"),
                                     str(tmp_path))
  assert results["method"] == "zero_mantissa" and results["bits"] == 9
  state, progress = train.latest_checkpoint(str(tmp_path))
  assert progress["records"] == {"zero_mantissa": {"kernels": 4}}
  params = state["variables"]["params"]
  for layer in ("conv1", "conv2", "conv3", "fc"):
    kernel = np.asarray(params[layer]["kernel"])
    mantissa, _ = np.frexp(kernel)
    assert np.all(np.isin(np.abs(mantissa), [0.0, 0.5])), layer
  assert np.any(np.asarray(params["fc"]["bias"]) % 1 != 0)  # biases left in float
  # The final accuracy is that of the method's weights, evaluated independently.
  config = tiny_config("fp")
  dataset = input_pipeline.create_dataset(config)
  model = models.create_model(config.model.name, config.model.num_classes)
  logits = model.apply(state["variables"], dataset.test_images, train=False)
  correct = int(np.sum(np.argmax(logits, -1) == dataset.test_labels))
  assert results["final_accuracy"] == correct / len(dataset.test_labels)
  assert results["fp_accuracy"] > 0.5  # chance is 0.1; see test_fp_method_...
