"""Every config loads for both datasets; typos in overrides are errors naming the field."""

import os
import subprocess
import sys

import pytest

import configs
import inq_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dataset", ["digits", "imagenet"])
@pytest.mark.parametrize("name", configs.available())
def test_every_config_loads(name, dataset):
  config = configs.get_config(name, dataset)
  assert config.name == name
  assert config.dataset == dataset
  assert config.method in ("fp", "inq")
  inq_jax.validate_schedule(config.inq.schedule)


def test_expected_configs_exist():
  assert {"fp", "inq_5bit", "inq_4bit", "inq_3bit", "inq_2bit"} <= set(configs.available())


@pytest.mark.parametrize("bits", [5, 4, 3, 2])
def test_inq_configs_use_paper_resnet18_schedules(bits):
  config = configs.get_config(f"inq_{bits}bit", "imagenet")
  assert config.inq.bits == bits
  assert tuple(config.inq.schedule) == inq_jax.SCHEDULES[bits]
  assert config.batch_size == 80 and config.inq.weight_decay == 5e-4


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


def test_command_line_override_typo_names_the_field():
  result = subprocess.run(
      [sys.executable, "-m", "experiments.digits", "--config=inq_5bit",
       "--config.inq.bitz=4", "--workdir=/nonexistent/never/used"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "bitz" in result.stderr
  assert not os.path.exists("/nonexistent/never/used")
