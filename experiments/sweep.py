"""`python -m experiments.sweep --config=NAME --workdir=DIR`: runs every point of a sweep.

A config module defines, next to `get_config(dataset)`, a big_vision-style

  def sweep(add, reduced=False):
    for bits in (5, 4):
      add(**{"inq.bits": bits, "seed": 0})

Each `add(**overrides)` is one run: the module's config with the dotted-path overrides
applied by `configs.apply_overrides` (a field that does not exist is an error naming it).
`reduced=True` asks for the smaller variant that fits CI (`--reduced`); the module
docstring documents both.

Every point runs `train.train_and_evaluate` in its own directory `DIR/<point name>`, named
from its overrides in the order given (`bits=4,strategy=random,seed=0`). Points run one
after another. Rerunning the same command
  * skips points whose results.json exists,
  * resumes an interrupted point from the Orbax checkpoint in its directory,
  * retries points that failed.
A failing point does not stop the sweep: its error and traceback go to `error.json` in
its directory, every outcome is appended to `DIR/sweep_status.jsonl`, and the command
exits with status 1 after a summary of all points.
"""

import os
import re
import time
import traceback

from absl import app
from absl import flags
from absl import logging
import pandas as pd

import configs
from experiments import files
from experiments import logs
from experiments import train

RESULTS_FILE = "results.json"
ERROR_FILE = "error.json"
STATUS_FILE = "sweep_status.jsonl"

def format_value(value):
  """A short file-name-safe rendering of an override value: (0.5, 1.0) -> 0.5-1."""
  if isinstance(value, bool):
    text = str(value).lower()
  elif isinstance(value, float):
    text = f"{value:g}"
  elif isinstance(value, (tuple, list)):
    text = "-".join(format_value(v) for v in value)
  else:
    text = str(value)
  return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def point_name(overrides):
  """Directory name of a point: `field=value` joined by commas, in the order given.

  A field is named by its last dotted component (`inq.bits` -> `bits`) unless another
  override of the point shares that component, then by its full path.
  """
  if not overrides:
    return "default"
  last = [key.split(".")[-1] for key in overrides]
  parts = []
  for key, short in zip(overrides, last, strict=True):
    label = short if last.count(short) == 1 else key
    parts.append(f"{label}={format_value(overrides[key])}")
  return ",".join(parts)


def collect_points(module, reduced):
  """Calls `module.sweep(add, reduced=...)`; returns the points as [(name, overrides)]."""
  if not hasattr(module, "sweep"):
    raise ValueError(f"Config module {module.__name__} defines no sweep(add).")
  points = []
  module.sweep(lambda **overrides: points.append(dict(overrides)), reduced=reduced)
  if not points:
    raise ValueError(f"{module.__name__}.sweep() added no points (reduced={reduced}).")
  named = [(point_name(overrides), overrides) for overrides in points]
  names = [name for name, _ in named]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f"{module.__name__}.sweep() adds the same point more than once: "
                     f"{duplicates}.")
  return named


def sweep_configs(config_name, dataset, reduced):
  """The sweep's points as [(name, config)]: base config with each point's overrides."""
  module = configs.load_module(config_name)
  base_config = configs.get_config(config_name, dataset)
  return [(name, configs.apply_overrides(base_config, overrides))
          for name, overrides in collect_points(module, reduced)]


def run_point(name, config, point_dir, train_fn):
  """Runs one point; returns its status record (the error is also left in error.json)."""
  start = time.time()
  error_path = os.path.join(point_dir, ERROR_FILE)
  try:
    results = train_fn(config, point_dir)
  except Exception as error:  # pylint: disable=broad-except
    record = {"point": name, "status": "failed", "seconds": time.time() - start,
              "error": f"{type(error).__name__}: {error}"}
    os.makedirs(point_dir, exist_ok=True)
    files.write_json_atomically(error_path, dict(record, traceback=traceback.format_exc()))
    logging.exception("Point %s failed", name)
    return record
  if os.path.exists(error_path):
    os.remove(error_path)
  if results is None:  # stopped early by config.stop_after_steps
    return {"point": name, "status": "stopped", "seconds": time.time() - start}
  metric = "perplexity" if "perplexity" in results else "final_accuracy"
  return {"point": name, "status": "done", "seconds": time.time() - start,
          metric: results[metric]}


def run_sweep(config_name, workdir, dataset, reduced, train_fn=train.train_and_evaluate):
  """Runs the points of `config_name`'s sweep in `workdir/<point name>`, one by one.

  Args:
    config_name: config name in configs/ or path to a config file with `sweep(add)`.
    workdir: sweep directory.
    dataset: passed to `get_config`.
    reduced: run the sweep's reduced variant.
    train_fn: `train_and_evaluate(config, workdir)`-like function running one point.

  Returns:
    One status record per point ({"point", "status", "seconds", ...}), status being
    "done", "skipped" (results.json already there), "stopped" or "failed".
  """
  points = sweep_configs(config_name, dataset, reduced)
  os.makedirs(workdir, exist_ok=True)
  logging.info("Sweep %s (%s, reduced=%s): %d points in %s", config_name, dataset,
               reduced, len(points), workdir)
  records = []
  for index, (name, config) in enumerate(points):
    point_dir = os.path.join(workdir, name)
    if os.path.exists(os.path.join(point_dir, RESULTS_FILE)):
      record = {"point": name, "status": "skipped", "seconds": 0.0}
      logging.info("[%d/%d] %s: results.json present, skipped", index + 1, len(points), name)
    else:
      logging.info("[%d/%d] %s: running", index + 1, len(points), name)
      record = run_point(name, config, point_dir, train_fn)
      logging.info("[%d/%d] %s: %s in %.1f s", index + 1, len(points), name,
                   record["status"], record["seconds"])
    files.append_jsonl(os.path.join(workdir, STATUS_FILE), dict(record, time=time.time()))
    records.append(record)
  return records


def format_summary(records):
  """A plain-text table with one line per point, then the count of each status."""
  table = pd.DataFrame({
      "point": [record["point"] for record in records],
      "status": [record["status"] for record in records],
      "seconds": [f"{record['seconds']:.1f} s" for record in records],
      "detail": [f"final accuracy {record['final_accuracy']:.4f}"
                 if "final_accuracy" in record else
                 f"perplexity {record['perplexity']:.4f}" if "perplexity" in record
                 else record.get("error", "")
                 for record in records]})
  counts = {status: sum(r["status"] == status for r in records)
            for status in ("done", "skipped", "stopped", "failed")}
  return "\n".join([table.to_string(index=False, header=False, justify="left"),
                    ", ".join(f"{count} {status}" for status, count in counts.items())])


def define_flags():
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to another entry point does not define --workdir twice)."""
  flags.DEFINE_string("config", None, "Config name in configs/ or path to a .py config "
                      "file that defines sweep(add, reduced=False).", required=True)
  flags.DEFINE_string("workdir", None, "Sweep directory; one sub-directory per point.",
                      required=True)
  flags.DEFINE_string("dataset", "digits",
                      "Dataset passed to get_config (digits | imagenet).")
  flags.DEFINE_bool("reduced", False, "Run the sweep's reduced (CI) variant.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.hide_orbax_logs()
  start = time.time()
  records = run_sweep(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.dataset,
                      flags.FLAGS.reduced)
  print(format_summary(records))
  print(f"Sweep wall time {time.time() - start:.1f} s; status log "
        f"{os.path.join(flags.FLAGS.workdir, STATUS_FILE)}")
  return 1 if any(record["status"] == "failed" for record in records) else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
