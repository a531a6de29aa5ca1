"""Shared absl entry point of `python -m experiments.digits`, `experiments.imagenet` and
`experiments.llm`.

  --config=NAME_OR_PATH   a config in configs/ (e.g. inq_5bit, comq_4bit, rtn_4bit) or a
                          path to a .py file
  --config.FIELD=VALUE    overrides a field; an unknown field is an error naming it
  --workdir=DIR           default ./workdirs/<dataset>_<config name>; rerunning with the
                          same workdir resumes the run

Several processes (one per host, or per GPU) train one run together through
`jax.distributed`: each process runs this same command. Under SLURM (`srun`) or Open MPI
(`mpirun`) nothing more is needed; elsewhere each process adds
  --coordinator_address=HOST:PORT   process 0's host and a free port, the same everywhere
                                    (or JAX_COORDINATOR_ADDRESS=HOST:PORT)
  --num_processes=N --process_id=I  I from 0 (on HOST) to N - 1
See docs/multi-host.md.
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
from experiments import text
from experiments import train

# The config of each entry point when --config is not given.
DEFAULT_CONFIGS = {"digits": "inq_5bit", "imagenet": "inq_5bit", "text": "llm_comq_4bit"}

# How the launchers that `jax.distributed.initialize()` recognises by itself
# (jax/_src/clusters) announce a job step: every variable is set, the last one holding the
# number of processes.
LAUNCHER_VARIABLES = (
    ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"),
)


def launched_as_several_processes(coordinator_address, num_processes, process_id):
  """Whether this process is one of several: set by the flags, JAX_COORDINATOR_ADDRESS or
  a SLURM / Open MPI launch of more than one task."""
  if (coordinator_address, num_processes, process_id) != (None, None, None):
    return True
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    return True
  return any(all(name in os.environ for name in names) and int(os.environ[names[-1]]) > 1
             for names in LAUNCHER_VARIABLES)


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
  flags.DEFINE_string("config", DEFAULT_CONFIGS.get(dataset, "inq_5bit"), help_string,
                      flag_values=name_flags)
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
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-process runs: HOST:PORT of process 0's coordinator, the same "
                      "for every process (default: from SLURM, Open MPI or "
                      "JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None,
                       "Multi-process runs: the number of processes (default: from the "
                       "launcher's environment).")
  flags.DEFINE_integer("process_id", None,
                       "Multi-process runs: this process's index, 0 to num_processes - 1 "
                       "(default: from the launcher's environment).")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed = dict(coordinator_address=flags.FLAGS.coordinator_address,
                       num_processes=flags.FLAGS.num_processes,
                       process_id=flags.FLAGS.process_id)
    logs.hide_backend_probe_logs()
    if launched_as_several_processes(**distributed):
      # Before anything else touches JAX: the backends start with the distributed client.
      jax.distributed.initialize(**distributed)
    logs.hide_orbax_logs()
    logs.label_processes()
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join("workdirs", f"{dataset}_{config.name}")
    logging.info("JAX devices: %d of the run's %d, %s; workdir %s", jax.local_device_count(),
                 jax.device_count(), jax.local_devices(), workdir)
    try:
      results = train.train_and_evaluate(config, workdir)
    except (input_pipeline.ImageNetNotPreparedError, text.TfdsNotPreparedError,
            ValueError, FileNotFoundError) as error:
      # The message names the bad input and what is allowed; a traceback would not add to
      # it (it is logged at verbosity 1: --verbosity=1).
      logging.debug("The run stopped:", exc_info=True)
      sys.exit(f"Error: {error}")
    if results is not None:
      print(report.format_results(results))
      print(f"Results written to {os.path.join(workdir, 'results.json')}")

  app.run(main, flags_parser=lambda argv: parse_flags(argv, dataset))
