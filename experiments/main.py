"""Shared absl entry point of `python -m experiments.digits` and `experiments.imagenet`.

  --config=NAME_OR_PATH   a config in configs/ (e.g. inq_5bit, comq_4bit, rtn_4bit) or a
                          path to a .py file
  --config.FIELD=VALUE    overrides a field; an unknown field is an error naming it
  --workdir=DIR           default ./workdirs/<dataset>_<config name>; rerunning with the
                          same workdir resumes the run
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections.config_flags import config_flags as config_flags_lib

import configs
from experiments import input_pipeline
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


METHOD_NAMES = {"fp": "full precision", "inq": "INQ", "comq": "COMQ",
                "rtn": "round-to-nearest"}


def format_results(results):
  """A plain-text table of a results dict: accuracies and sizes for every method, the INQ
  portions, and COMQ's per-layer errors against round-to-nearest on the same grid."""
  bits = results["bits"]
  method = METHOD_NAMES[results["method"]]
  rows = [("Full-precision test accuracy", f"{results['fp_accuracy']:.4f}")]
  for entry in results["portion_accuracies"]:
    rows.append((f"  after INQ portion {entry['portion']:g}", f"{entry['accuracy']:.4f}"))
  if results["method"] != "fp":
    rows.append((f"Final {bits}-bit {method} test accuracy",
                 f"{results['final_accuracy']:.4f} "
                 f"({100 * (results['final_accuracy'] - results['fp_accuracy']):+.2f} points)"))
  if results["packed_accuracy"] is not None:
    rows.append(("  through the packed shift kernel", f"{results['packed_accuracy']:.4f}"))
  if results["codebook_fraction"] is not None:
    rows.append(("Weights in the power-of-two codebook",
                 f"{100 * results['codebook_fraction']:.2f}%"))
  rows.append(("Model size FP32", f"{results['fp32_bytes']:,} bytes"))
  if results["method"] != "fp":
    rows.append((f"Model size packed ({bits}-bit kernels)",
                 f"{results['packed_bytes']:,} bytes "
                 f"({results['fp32_bytes'] / results['packed_bytes']:.2f}x smaller)"))
    rows.append(("  information-theoretic (uniform codes)",
                 f"{results['codebook_bytes']:,.0f} bytes"))
    if results["entropy_bytes"] is not None:
      rows.append(("  empirical code entropy", f"{results['entropy_bytes']:,.0f} bytes"))
  width = max(len(name) for name, _ in rows)
  title = f"{results['config_name']} on {results['dataset']} ({results['model']})"
  lines = [title, "-" * len(title)] + [f"{name:<{width}}  {value}" for name, value in rows]
  if results["layers"]:
    lines += ["", f"Per-layer error ||XW - XQ||_F on the calibration set ({bits}-bit):"]
    header = ("layer", "shape", "COMQ", "RTN", "COMQ/RTN", "seconds")
    table = [header] + [
        (layer["path"], "x".join(map(str, layer["shape"])), f"{layer['comq_error']:.4g}",
         f"{layer['rtn_error']:.4g}",
         f"{layer['comq_error'] / layer['rtn_error']:.3f}" if layer["rtn_error"] else "-",
         f"{layer['seconds']:.2f}") for layer in results["layers"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))) for row in table]
  return "\n".join(lines)


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
    try:
      results = train.train_and_evaluate(config, workdir)
    except input_pipeline.ImageNetNotPreparedError as error:
      sys.exit(f"Error: {error}")  # the message says what to do; a traceback would not
    if results is not None:
      print(format_results(results))
      print(f"Results written to {os.path.join(workdir, 'results.json')}")

  app.run(main)
