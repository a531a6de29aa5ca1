"""Shared absl entry point of `python -m experiments.digits` and `experiments.imagenet`.

  --config=NAME_OR_PATH   a config in configs/ (e.g. inq_5bit) or a path to a .py file
  --config.FIELD=VALUE    overrides a field; an unknown field is an error naming it
  --workdir=DIR           default ./workdirs/<dataset>_<config name>; rerunning with the
                          same workdir resumes the run
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections.config_flags import config_flags as config_flags_lib

import configs
from experiments import train


class ConfigNameOrFileParser(flags.ArgumentParser):
  """Parses --config as a config name or a file, for a fixed dataset."""

  def __init__(self, dataset):
    self.dataset = dataset

  def parse(self, argument):
    return configs.get_config(argument, self.dataset)

  def flag_type(self):
    return "config object"


def define_flags(dataset):
  # ml_collections has no public constructor for a config flag with a custom parser;
  # _ConfigFlag is the class DEFINE_config_file itself uses, and gives --config.x overrides.
  flags.DEFINE_flag(config_flags_lib._ConfigFlag(  # pylint: disable=protected-access
      parser=ConfigNameOrFileParser(dataset),
      serializer=flags.ArgumentSerializer(), name="config", default="inq_5bit",
      help_string=f"Config name in configs/ ({', '.join(configs.available())}) or path "
                  "to a config file; override fields with --config.FIELD=VALUE."))
  flags.DEFINE_string("workdir", None,
                      "Run directory (checkpoints, metrics, results); default "
                      f"./workdirs/{dataset}_<config name>.")


def format_results(results):
  """A plain-text table of a results dict."""
  rows = [("Full-precision test accuracy", f"{results['fp_accuracy']:.4f}")]
  for entry in results["portion_accuracies"]:
    rows.append((f"  after INQ portion {entry['portion']:g}", f"{entry['accuracy']:.4f}"))
  rows.append((f"Final {results['bits']}-bit test accuracy", f"{results['final_accuracy']:.4f}"))
  if results["codebook_fraction"] is not None:
    rows.append(("Weights in the power-of-two codebook",
                 f"{100 * results['codebook_fraction']:.2f}%"))
  rows.append(("Model size FP32", f"{results['fp32_bytes']:,} bytes"))
  rows.append((f"Model size packed ({results['bits']}-bit kernels)",
               f"{results['packed_bytes']:,} bytes "
               f"({results['fp32_bytes'] / results['packed_bytes']:.2f}x smaller)"))
  width = max(len(name) for name, _ in rows)
  title = f"{results['config_name']} on {results['dataset']} ({results['model']})"
  return "\n".join([title, "-" * len(title)] +
                   [f"{name:<{width}}  {value}" for name, value in rows])


def run(dataset):
  """Defines the flags and runs `train_and_evaluate` for `dataset`."""
  define_flags(dataset)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Orbax logs every checkpoint write at INFO; keep the log to our progress lines.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join("workdirs", f"{dataset}_{config.name}")
    logging.info("JAX devices: %s; workdir %s", jax.local_devices(), workdir)
    results = train.train_and_evaluate(config, workdir)
    if results is not None:
      print(format_results(results))
      print(f"Results written to {os.path.join(workdir, 'results.json')}")

  app.run(main)
