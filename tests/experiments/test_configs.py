"""Every config loads for both datasets; typos in overrides are errors naming the field."""

import os
import subprocess
import sys

import pytest

import configs
from configs import base
from configs import fp_vit
from experiments import input_pipeline
from experiments import methods
from experiments import report
from experiments import train
import inq_jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


IMAGE_DATASETS = ("imagenet", "digits")


def config_datasets(name):
  """The datasets a config is made for: its module's DATASETS, else the image datasets."""
  return getattr(configs.load_module(name), "DATASETS", IMAGE_DATASETS)


@pytest.mark.parametrize("dataset", base.DATASETS)
@pytest.mark.parametrize("name", configs.available())
def test_every_config_loads(name, dataset):
  module = configs.load_module(name)
  if dataset not in config_datasets(name):
    if hasattr(module, "DATASETS"):
      with pytest.raises(ValueError, match=dataset):  # a clear error, not another model
        configs.get_config(name, dataset)
    return
  config = configs.get_config(name, dataset)
  assert config.name == name
  assert config.dataset == dataset
  methods.get(config.method).check(config)
  inq_jax.validate_schedule(config.inq.schedule)


def test_expected_configs_exist():
  assert {"fp", "inq_5bit", "inq_4bit", "inq_3bit", "inq_2bit", "comq_4bit", "comq_3bit",
          "comq_2bit", "rtn_4bit", "rtn_3bit", "rtn_2bit", "fp_vit", "comq_4bit_vit",
          "comq_3bit_vit", "rtn_4bit_vit", "inq_5bit_vit",
          "inq_2bit_compensated"} <= set(configs.available())
  # The language-model configs of experiments.llm.
  assert {"llm_fp", "llm_inq_5bit"} | {f"llm_{method}_{bits}bit" for method in (
      "comq", "gptq", "rtn") for bits in (4, 3, 2)} <= set(configs.available())


@pytest.mark.parametrize("name", ["comq_4bit", "gptq_3bit", "rtn_2bit", "inq_5bit", "fp"])
def test_llm_configs_are_the_method_configs_on_text(name):
  config = configs.get_config(f"llm_{name}", "text")
  reference = configs.get_config(name, "text")
  assert changed_fields(config, reference) == {"name": f"llm_{name}"}
  assert (config.dataset, config.model.name, config.data.corpus) == ("text", "byte_llama",
                                                                     "kjv")


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_comq_configs_follow_the_official_recipe(bits):
  config = configs.get_config(f"comq_{bits}bit", "imagenet")
  assert (config.method, config.comq.bits) == ("comq", bits)
  assert (config.comq.iters, config.comq.order, config.comq.scale_update) == (1, "greedy",
                                                                              False)
  assert (config.comq.grid, config.comq.granularity, config.comq.inputs) == (
      "asymmetric", "channel", "fp")
  assert config.comq.skip_first_last is None  # the model's official recipe
  # README 2-bit recipe: --scalar 0.65; 1.0 otherwise.
  assert config.comq.scalar == (0.65 if bits == 2 else 1.0)
  assert config.calibration.num_examples == 1024
  assert configs.get_config(f"comq_{bits}bit", "digits").calibration.num_examples == 256
  rtn = configs.get_config(f"rtn_{bits}bit", "imagenet")
  assert (rtn.method, rtn.rtn.bits, rtn.rtn.grid, rtn.rtn.granularity) == (
      "rtn", bits, "asymmetric", "channel")


def changed_fields(config, reference):
  """{dotted path: value} of the fields where `config` differs from `reference`."""
  config, reference = report.flatten(config.to_dict()), report.flatten(reference.to_dict())
  assert config.keys() == reference.keys()
  return {key: config[key] for key in config if config[key] != reference[key]}


# name -> (the config it derives from, the fields it changes besides fp_vit.VIT and name).
VIT_CONFIGS = {"fp_vit": ("fp", {}), "comq_4bit_vit": ("comq_4bit", {}),
               "comq_3bit_vit": ("comq_4bit", {"comq.bits": 3}),
               "rtn_4bit_vit": ("rtn_4bit", {}), "inq_5bit_vit": ("inq_5bit", {})}


@pytest.mark.parametrize("name", VIT_CONFIGS)
def test_vit_configs_are_their_cnn_config_with_the_vit_recipe(name):
  parent, extra = VIT_CONFIGS[name]
  config = configs.get_config(name, "digits")
  assert changed_fields(config, configs.get_config(parent, "digits")) == {
      "name": name, **fp_vit.VIT, **extra}
  assert config.model.name == "ViTDigits"
  assert config_datasets(name) == ("digits",)


def test_vit_recipe_changes_only_training_fields():
  # The quantizers' settings (bits, grids, INQ schedule and retraining) stay the CNN's.
  assert set(fp_vit.VIT) == {"model.name", "batch_size", "fp.num_epochs",
                             "fp.learning_rate", "fp.weight_decay", "fp.lr_decay_epoch"}
  assert fp_vit.VIT["fp.lr_decay_epoch"] < fp_vit.VIT["fp.num_epochs"]


@pytest.mark.integration
def test_comq_on_unprepared_imagenet_fails_fast(tmp_path):
  config = configs.apply_overrides(configs.get_config("comq_4bit", "imagenet"),
                                   {"data.data_dir": str(tmp_path), "num_devices": 1})
  with pytest.raises(input_pipeline.ImageNetNotPreparedError, match="tfds build"):
    train.train_and_evaluate(config, str(tmp_path / "workdir"))


@pytest.mark.parametrize("bits", [5, 4, 3, 2])
def test_inq_configs_use_paper_resnet18_schedules(bits):
  config = configs.get_config(f"inq_{bits}bit", "imagenet")
  assert config.inq.bits == bits
  assert tuple(config.inq.schedule) == inq_jax.SCHEDULES[bits]
  assert config.batch_size == 80 and config.inq.weight_decay == 5e-4


@pytest.mark.parametrize("dataset", base.DATASETS)
def test_ternary_recipe_is_the_paper_recipe_plus_the_options(dataset):
  recipe = report.flatten(configs.get_config("inq_2bit_compensated", dataset).to_dict())
  paper = report.flatten(configs.get_config("inq_2bit", dataset).to_dict())
  assert {key for key in paper if recipe[key] != paper[key]} == {
      "name", "inq.compensation.choose", "inq.compensation.correct", "inq.distill_alpha",
      "inq.final_epochs"}
  assert not configs.get_config("inq_2bit", dataset).inq.compensation.choose  # off: paper


def test_config_by_path_matches_config_by_name():
  path = os.path.join(REPO, "configs", "inq_4bit.py")
  assert configs.get_config(path, "digits") == configs.get_config("inq_4bit", "digits")


def test_unknown_name_and_dataset_are_errors():
  with pytest.raises(ValueError, match="inq_7bit"):
    configs.get_config("inq_7bit", "digits")
  with pytest.raises(ValueError, match="cifar"):
    configs.get_config("inq_5bit", "cifar")


def test_configs_are_locked():
  config = configs.get_config("inq_5bit", "digits")
  with pytest.raises(AttributeError, match="bitz"):
    config.inq.bitz = 4


def test_apply_overrides():
  config = configs.get_config("inq_5bit", "digits")
  changed = configs.apply_overrides(config, {"inq.bits": 4, "seed": 3})
  assert (changed.inq.bits, changed.seed) == (4, 3)
  assert config.inq.bits == 5
  with pytest.raises(KeyError, match="inq.bitz"):
    configs.apply_overrides(config, {"inq.bitz": 4})


@pytest.mark.integration
def test_command_line_override_typo_names_the_field():
  result = subprocess.run(
      [sys.executable, "-m", "experiments.digits", "--config=inq_5bit",
       "--config.inq.bitz=4", "--workdir=/nonexistent/never/used"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "bitz" in result.stderr
  assert not os.path.exists("/nonexistent/never/used")
