"""Config resolver shared by the entry points, notebooks and sweeps.

  config = configs.get_config("inq_5bit", dataset="digits")       # by name
  config = configs.get_config("path/to/my_config.py", "imagenet")  # by file

A name selects `configs/<name>.py`; anything ending in ".py" is loaded as a file. Each
config module defines `get_config(dataset)`. The result is locked, so assigning a field
that does not exist (a typo) raises an error naming the field.
"""

import importlib
import importlib.util
import os

import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def available():
  """Names of the config modules in configs/ (every file with a `get_config`)."""
  names = []
  for file_name in sorted(os.listdir(CONFIG_DIR)):
    name, extension = os.path.splitext(file_name)
    if extension == ".py" and not name.startswith("_") and name != "base":
      names.append(name)
  return names


def load_module(name_or_path):
  """Imports the config module named `name_or_path` or found at that file path."""
  if name_or_path.endswith(".py"):
    if not os.path.isfile(name_or_path):
      raise FileNotFoundError(f"Config file {name_or_path!r} does not exist.")
    module_name = "config_" + os.path.splitext(os.path.basename(name_or_path))[0]
    spec = importlib.util.spec_from_file_location(module_name, name_or_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  if name_or_path not in available():
    raise ValueError(
        f"Unknown config {name_or_path!r}; expected a path ending in .py or one of "
        f"{available()}.")
  return importlib.import_module(f"configs.{name_or_path}")


def get_config(name_or_path, dataset):
  """Returns the locked config `name_or_path` for `dataset` ("imagenet" | "digits")."""
  config = load_module(name_or_path).get_config(dataset)
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"{name_or_path}: get_config() must return a ConfigDict.")
  config.lock()
  return config


def apply_overrides(config, overrides):
  """Returns a copy of `config` with dotted-path `overrides` applied ({"inq.bits": 4}).

  For notebooks and sweeps; the command line gets the same check from the config flag.
  An unknown field raises an error naming it.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.lock()
  for dotted_path, value in overrides.items():
    *parents, field = dotted_path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if field not in node:
      raise KeyError(f"Config has no field {dotted_path!r}.")
    node[field] = value
  return config
