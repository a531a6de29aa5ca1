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
from ml_collections import config_flags

import configs
from experiments import input_pipeline
from experiments import logs
from experiments import report
from experiments import train


def parse_flags(argv, dataset):
  """Parses `argv` with --config resolved by `configs.get_config(NAME_OR_PATH, dataset)`.

  ml_collections' public config flags load either a file path or a fixed ConfigDict, not
  a name, so a first pass reads --config alone and hands the resolved config to
  `DEFINE_config_dict`, whose flag applies and checks the --config.FIELD=VALUE overrides.

  Args:
    argv: the command line, program name first.
    dataset: passed to `configs.get_config`.

  Returns:
    The arguments left after the flags, argv[0] first, for `main`.
  """
  help_string = (f"Config name in configs/ ({', '.join(configs.available())}) or path to "
                 "a config file; override fields with --config.FIELD=VALUE.")
  name_flags = flags.FlagValues()
  name_flags.set_gnu_getopt(True)  # look past positional values ("--workdir DIR")
  flags.DEFINE_string("config", "inq_5bit", help_string, flag_values=name_flags)
  try:
    argv = name_flags(argv, known_only=True)  # every argument but --config
    config = configs.get_config(name_flags.config, dataset)
  except (flags.Error, ValueError, FileNotFoundError) as error:
    sys.exit(f"FATAL Flags parsing error: {error}")  # as absl reports its flag errors
  # The overrides are looked for in sys_argv; in sys.argv, the flag would find
  # --config=NAME and parse NAME as its ConfigDict.
  config_flags.DEFINE_config_dict("config", config, help_string, sys_argv=argv)
  return app.parse_flags_with_usage(argv)


def run(dataset):
  """Defines the flags and runs `train_and_evaluate` for `dataset`."""
  flags.DEFINE_string("workdir", None,
                      "Run directory (checkpoints, metrics, results); default "
                      f"./workdirs/{dataset}_<config name>.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.hide_orbax_logs()
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join("workdirs", f"{dataset}_{config.name}")
    logging.info("JAX devices: %s; workdir %s", jax.local_devices(), workdir)
    try:
      results = train.train_and_evaluate(config, workdir)
    except input_pipeline.ImageNetNotPreparedError as error:
      sys.exit(f"Error: {error}")  # the message says what to do; a traceback would not
    if results is not None:
      print(report.format_results(results))
      print(f"Results written to {os.path.join(workdir, 'results.json')}")

  app.run(main, flags_parser=lambda argv: parse_flags(argv, dataset))
