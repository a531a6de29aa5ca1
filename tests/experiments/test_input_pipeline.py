"""Digits split and determinism; imagenet2012 on TFDS mock data; fail-fast when unprepared."""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

import configs
from experiments import input_pipeline
from experiments import train


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_digits_split_sizes_and_range():
  data = input_pipeline.DigitsData(test_size=0.25, split_seed=0)
  assert (data.num_train_examples, len(data.test_labels)) == (1347, 450)
  assert data.train_images.min() >= 0.0 and data.train_images.max() <= 1.0
  assert sorted(np.unique(data.test_labels)) == list(range(10))


def test_digits_order_is_a_function_of_the_seed_and_skip_resumes():
  data = input_pipeline.DigitsData(test_size=0.25, split_seed=0)
  first = list(data.train_epoch(32, (0, 1, 2)))
  again = list(data.train_epoch(32, (0, 1, 2)))
  other = list(data.train_epoch(32, (0, 1, 3)))
  assert len(first) == 1347 // 32
  np.testing.assert_array_equal(first[5]["label"], again[5]["label"])
  assert not np.array_equal(first[0]["label"], other[0]["label"])
  skipped = list(data.train_epoch(32, (0, 1, 2), skip_batches=5))
  np.testing.assert_array_equal(skipped[0]["image"], first[5]["image"])


def test_eval_batches_pad_and_mask():
  data = input_pipeline.DigitsData(test_size=0.25, split_seed=0)
  batches = list(data.eval_batches(256))
  assert [b["image"].shape[0] for b in batches] == [256, 256]
  assert sum(float(b["mask"].sum()) for b in batches) == 450
  assert batches[-1]["mask"][193] == 1.0 and batches[-1]["mask"][194] == 0.0


def test_unprepared_imagenet_fails_fast_with_instructions(tmp_path):
  config = configs.apply_overrides(configs.get_config("inq_5bit", "imagenet"),
                                   {"data.data_dir": str(tmp_path)})
  with pytest.raises(input_pipeline.ImageNetNotPreparedError) as error:
    input_pipeline.create_dataset(config)
  message = str(error.value)
  assert str(tmp_path) in message
  assert "ILSVRC2012_img_train.tar" in message and "manual_dir" in message
  assert "tfds build imagenet2012" in message
  assert list(tmp_path.iterdir()) in ([], [tmp_path / "downloads"])
  assert not (tmp_path / "imagenet2012").exists()


@pytest.mark.integration
def test_imagenet_command_fails_fast_without_a_traceback_or_a_workdir(tmp_path):
  workdir = tmp_path / "workdir"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.imagenet", "--config=inq_5bit",
       f"--config.data.data_dir={tmp_path}", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  assert "imagenet2012 is not prepared" in result.stderr
  assert "tfds build imagenet2012" in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def mock_imagenet_config():
  return configs.apply_overrides(configs.get_config("inq_5bit", "imagenet"), {
      "data.image_size": 32, "data.resize_size": 36, "data.num_train_examples": 8,
      "data.num_eval_examples": 8, "data.shuffle_buffer": 8, "batch_size": 4,
      "eval_batch_size": 4, "inq.schedule": (0.5, 1.0), "inq.epochs_per_step": 1,
      "num_devices": 1, "log_every_steps": 1})


def mock_imagenet():
  """TFDS mock imagenet2012; is_prepared is patched since mock_data leaves it alone."""
  return (tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE),
          mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True))


def test_imagenet_pipeline_on_mock_data():
  data_mock, prepared_mock = mock_imagenet()
  with data_mock, prepared_mock:
    data = input_pipeline.create_dataset(mock_imagenet_config())
    batches = list(data.train_epoch(4, (0, 0, 0)))
    again = list(data.train_epoch(4, (0, 0, 0)))
    eval_batches = list(data.eval_batches(4))
  assert len(batches) == 2
  assert batches[0]["image"].shape == (4, 32, 32, 3) and batches[0]["image"].dtype == np.float32
  np.testing.assert_array_equal(batches[1]["image"], again[1]["image"])
  assert len(eval_batches) == 2 and eval_batches[0]["image"].shape == (4, 32, 32, 3)
  assert np.all(np.isfinite(batches[0]["image"]))


@pytest.mark.integration
def test_resnet18_inq_on_mock_imagenet(tmp_path):
  """The real ImageNet path end to end: FP eval -> portion 0.5 (2 SGD steps) -> 1.0.

  Checkpoints are written inside the mock too: the pipeline opens its splits once, so no
  `as_dataset` (and its temporary mock file system) runs while Orbax saves in the
  background.
  """
  workdir = str(tmp_path)
  data_mock, prepared_mock = mock_imagenet()
  with data_mock, prepared_mock:
    results = train.train_and_evaluate(mock_imagenet_config(), workdir)
  assert results["model"] == "ResNet18" and results["codebook_fraction"] == 1.0
  assert [p["portion"] for p in results["portion_accuracies"]] == [0.5, 1.0]
  # Random weights on random mock labels: no accuracy to expect, but the masked eval
  # counts each of the 8 eval images once (a padded image counted would break this).
  assert results["final_accuracy"] * 8 == pytest.approx(round(results["final_accuracy"] * 8))
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["phase_name"] for r in records if r["type"] == "eval"] == ["fp", "inq_0.5",
                                                                      "inq_1"]
  train_steps = [r for r in records if r["type"] == "train"]
  assert [r["phase_name"] for r in train_steps] == ["inq_0.5", "inq_0.5"]
  assert all(np.isfinite(r["loss"]) for r in train_steps)
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    progress = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        progress=ocp.args.JsonRestore()))["progress"]
  assert progress["phase"] == 3 and progress["global_step"] == 2


class ShardedImagesForTest(tfds.core.GeneratorBasedBuilder):
  """A small image dataset with imagenet2012's features, prepared in the test's data_dir.

  TFDS's mock data ignores split slicing, so the per-process shares of ImageNetData
  (`tfds.split_for_jax_process`) are checked on real TFDS files instead.
  """
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None  # Nothing to download, so no checksums file to look up.

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12, 0),
            "validation": self._generate_examples(7, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for index in range(count):
      size = rng.integers(36, 48, size=2)
      yield index, {"image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
                    "label": int(rng.integers(1000))}


def _real_images(batches):
  """The bytes of each image that a batch's mask (if any) counts."""
  return [image.tobytes() for batch in batches
          for image, real in zip(batch["image"], batch.get("mask", np.ones(len(batch["image"]))),
                                 strict=True) if real]


def test_imagenet_processes_read_disjoint_shares_that_make_up_one_process_epoch(tmp_path):
  """Two processes' training epochs (augmented by global example index) and evaluation
  batches hold, together, exactly the images of one process's: each example once."""
  ShardedImagesForTest(data_dir=str(tmp_path)).download_and_prepare()
  config = mock_imagenet_config()
  preprocessing = input_pipeline.resolve_preprocessing(config)

  def data(process_index, process_count):
    return input_pipeline.ImageNetData(
        "sharded_images_for_test", str(tmp_path), None, preprocessing, shuffle_buffer=16,
        num_train_examples=8, num_eval_examples=7, process_index=process_index,
        process_count=process_count)

  whole, shares = data(0, 1), [data(0, 2), data(1, 2)]
  train = lambda d: list(d.train_epoch(4, (0, 1, 0)))
  evaluation = lambda d: list(d.eval_batches(4))
  # 8 of the 12 training examples in global batches of 4: each process feeds 2 rows.
  assert [b["image"].shape for b in train(whole)] == [(4, 32, 32, 3)] * 2
  for share in shares:
    assert [b["image"].shape for b in train(share)] == [(2, 32, 32, 3)] * 2
    # Eval shares of 4 and 3 images: both processes run 2 batches of 2 rows.
    assert [b["image"].shape for b in evaluation(share)] == [(2, 32, 32, 3)] * 2
  whole_eval = _real_images(evaluation(whole))
  share_evals = [_real_images(evaluation(share)) for share in shares]
  assert [len(e) for e in share_evals] == [4, 3] and len(whole_eval) == 7
  assert sorted(share_evals[0] + share_evals[1]) == sorted(whole_eval)
  # Crops and flips are keyed by an example's index in the whole split, so the shares'
  # augmented images are exactly the one-process epoch's.
  share_trains = [_real_images(train(share)) for share in shares]
  assert not set(share_trains[0]) & set(share_trains[1])
  assert sorted(share_trains[0] + share_trains[1]) == sorted(_real_images(train(whole)))
