"""experiments.sweep: naming, skipping finished points, failures, resumption, configs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import configs
from experiments import report
from experiments import sweep
from experiments import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A tiny INQ run on digits: 90% of the data held out, so ~4 training steps per epoch.
TINY_SWEEP = """
from configs import base

def get_config(dataset="digits"):
  config = base.get_config(dataset)
  config.name = "tiny"
  config.method = "inq"
  config.data.test_size = 0.9
  config.fp.num_epochs = 2
  config.inq.epochs_per_step = 2
  config.inq.schedule = (0.5, 1.0)
  config.log_every_steps = 2
  config.num_devices = 1
  return config

def sweep(add, reduced=False):
{body}
"""


def write_sweep_config(directory, body):
  path = os.path.join(directory, "tiny_sweep.py")
  with open(path, "w") as f:
    f.write(TINY_SWEEP.format(body=textwrap.indent(textwrap.dedent(body), "  ")))
  return path


class FakeTrain:
  """Stands in for train_and_evaluate: records calls, fails on chosen seeds once."""

  def __init__(self, fail_seeds=()):
    self.calls = []
    self.fail_seeds = set(fail_seeds)

  def __call__(self, config, workdir):
    self.calls.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    if config.seed in self.fail_seeds:
      self.fail_seeds.remove(config.seed)
      raise RuntimeError(f"seed {config.seed} diverged")
    results = {"final_accuracy": 0.5 + config.inq.bits / 100}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results


def read_status(workdir):
  with open(os.path.join(workdir, sweep.STATUS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_point_names_are_readable_deterministic_and_safe():
  assert sweep.point_name({"inq.bits": 4, "inq.strategy": "random", "seed": 1}) == \
      "bits=4,strategy=random,seed=1"
  assert sweep.point_name({"inq.schedule": (0.5, 1.0), "comq.scale_update": True}) == \
      "schedule=0.5-1,scale_update=true"
  # Fields sharing a last component keep their full path.
  assert sweep.point_name({"inq.bits": 4, "comq.bits": 3, "seed": 0}) == \
      "inq.bits=4,comq.bits=3,seed=0"
  assert sweep.point_name({"data.name": "a/b c"}) == "name=a_b_c"
  assert sweep.point_name({}) == "default"


def test_duplicate_points_and_bad_fields_are_errors(tmp_path):
  path = write_sweep_config(str(tmp_path), """
      add(seed=0)
      add(seed=0)
  """)
  with pytest.raises(ValueError, match=r"more than once: \['seed=0'\]"):
    sweep.run_sweep(path, str(tmp_path / "sweep"), "digits", False, FakeTrain())
  path = write_sweep_config(str(tmp_path), """
      add(seed=0)
      add(**{"inq.bitz": 4})
  """)
  fake = FakeTrain()
  with pytest.raises(KeyError, match="inq.bitz"):
    sweep.run_sweep(path, str(tmp_path / "sweep"), "digits", False, fake)
  assert fake.calls == []  # every point is checked before the first one runs
  with pytest.raises(ValueError, match="defines no sweep"):
    sweep.run_sweep("inq_5bit", str(tmp_path / "sweep"), "digits", False, fake)


def test_runs_all_points_records_failures_and_skips_finished_on_rerun(tmp_path):
  path = write_sweep_config(str(tmp_path), """
      for seed in (0,) if reduced else (0, 1, 2):
        add(**{"inq.bits": 4, "seed": seed})
  """)
  workdir = str(tmp_path / "sweep")
  fake = FakeTrain(fail_seeds=[1])
  records = sweep.run_sweep(path, workdir, "digits", False, fake)
  assert [(r["point"], r["status"]) for r in records] == [
      ("bits=4,seed=0", "done"), ("bits=4,seed=1", "failed"), ("bits=4,seed=2", "done")]
  assert fake.calls == ["bits=4,seed=0", "bits=4,seed=1", "bits=4,seed=2"]
  assert records[1]["error"] == "RuntimeError: seed 1 diverged"
  with open(os.path.join(workdir, "bits=4,seed=1", sweep.ERROR_FILE)) as f:
    error = json.load(f)
  assert error["error"] == "RuntimeError: seed 1 diverged"
  assert "diverged" in error["traceback"]
  summary = sweep.format_summary(records)
  assert "2 done, 0 skipped, 0 stopped, 1 failed" in summary
  assert "RuntimeError: seed 1 diverged" in summary

  # Rerun: finished points are skipped, the failed one is retried (and now succeeds).
  records = sweep.run_sweep(path, workdir, "digits", False, fake)
  assert [r["status"] for r in records] == ["skipped", "done", "skipped"]
  assert fake.calls[3:] == ["bits=4,seed=1"]
  assert not os.path.exists(os.path.join(workdir, "bits=4,seed=1", sweep.ERROR_FILE))
  assert [r["status"] for r in read_status(workdir)] == [
      "done", "failed", "done", "skipped", "done", "skipped"]

  # The reduced variant is a subset: nothing left to run.
  records = sweep.run_sweep(path, workdir, "digits", True, fake)
  assert [(r["point"], r["status"]) for r in records] == [("bits=4,seed=0", "skipped")]
  assert len(fake.calls) == 4


def test_point_stopped_early_is_reported_and_run_again(tmp_path):
  path = write_sweep_config(str(tmp_path), """
      add(seed=0)
  """)
  workdir = str(tmp_path / "sweep")
  calls = []
  stop = lambda config, point_dir: calls.append(point_dir)  # returns None, as when stopped
  records = sweep.run_sweep(path, workdir, "digits", False, stop)
  assert [r["status"] for r in records] == ["stopped"]
  assert "0 done, 0 skipped, 1 stopped, 0 failed" in sweep.format_summary(records)
  records = sweep.run_sweep(path, workdir, "digits", False, FakeTrain())
  assert [r["status"] for r in records] == ["done"]
  assert len(calls) == 1


@pytest.mark.integration
def test_killed_sweep_reruns_only_missing_points_and_resumes(tmp_path):
  """The second point trains 3 real steps and is killed; the rerun resumes it.

  Full precision only (one compiled train step), to keep the test short.
  """
  path = write_sweep_config(str(tmp_path), """
      for seed in (0, 1, 2):
        add(method="fp", seed=seed)
  """)
  workdir = str(tmp_path / "sweep")
  fake = FakeTrain()
  calls = []

  def killed_on_second_point(config, point_dir):
    calls.append(os.path.basename(point_dir))
    if config.seed != 1:
      return fake(config, point_dir)
    # Train 3 steps (a checkpoint is written when stopping), then die like a kill.
    assert train.train_and_evaluate(
        configs.apply_overrides(config, {"stop_after_steps": 3}), point_dir) is None
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(path, workdir, "digits", False, killed_on_second_point)
  assert calls == ["method=fp,seed=0", "method=fp,seed=1"]
  assert not os.path.exists(os.path.join(workdir, "method=fp,seed=1", "results.json"))

  def real_train_for_second_point(config, point_dir):
    calls.append(os.path.basename(point_dir))
    if config.seed != 1:
      return fake(config, point_dir)
    return train.train_and_evaluate(config, point_dir)

  records = sweep.run_sweep(path, workdir, "digits", False, real_train_for_second_point)
  assert [r["status"] for r in records] == ["skipped", "done", "done"]
  assert calls == ["method=fp,seed=0", "method=fp,seed=1", "method=fp,seed=1",
                   "method=fp,seed=2"]
  with open(os.path.join(workdir, "method=fp,seed=1", "metrics.jsonl")) as f:
    steps = [m["global_step"] for m in map(json.loads, f) if m["type"] == "train"]
  # Resumed from step 3: training steps were logged once each, never from step 0 again.
  assert steps[:2] == [2, 3] and steps == sorted(set(steps))
  with open(os.path.join(workdir, "method=fp,seed=1", "results.json")) as f:
    results = json.load(f)
  assert (results["seed"], results["method"], results["bits"]) == (1, "fp", 32)


@pytest.mark.integration
def test_command_line_records_a_failing_point_and_exits_nonzero(tmp_path):
  path = write_sweep_config(str(tmp_path), """
      add(**{"inq.strategy": "bogus", "seed": 0})
      add(**{"inq.strategy": "magnitude", "seed": 0})
  """)
  workdir = str(tmp_path / "sweep")
  finished = os.path.join(workdir, "strategy=magnitude,seed=0")
  os.makedirs(finished)
  with open(os.path.join(finished, "results.json"), "w") as f:
    json.dump({"final_accuracy": 0.9}, f)
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={path}",
       f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-2000:]
  assert "0 done, 1 skipped, 0 stopped, 1 failed" in result.stdout
  assert "bogus" in result.stdout
  with open(os.path.join(workdir, "strategy=bogus,seed=0", sweep.ERROR_FILE)) as f:
    assert "bogus" in json.load(f)["error"]


SWEEP_CONFIGS = [name for name in configs.available()
                 if hasattr(configs.load_module(name), "sweep")]


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
def test_every_sweep_is_valid(name):
  dataset = getattr(configs.load_module(name), "DATASETS", ("digits",))[0]
  full = sweep.sweep_configs(name, dataset, reduced=False)
  reduced = sweep.sweep_configs(name, dataset, reduced=True)
  assert 0 < len(reduced) < len(full)
  assert {point for point, _ in reduced} <= {point for point, _ in full}
  assert {config.seed for _, config in full} == {0, 1, 2}
  assert {config.seed for _, config in reduced} == {0}
  for _, config in full:
    assert config.name == name


def test_ablation_sweeps_cover_the_requested_grid():
  assert {"ablation_inq_partition", "ablation_inq_schedule"} <= set(SWEEP_CONFIGS)
  points = sweep.sweep_configs("ablation_inq_partition", "digits", reduced=False)
  assert len(points) == 4 * 2 * 3
  assert {(c.inq.bits, c.inq.strategy) for _, c in points} == {
      (b, s) for b in (5, 4, 3, 2) for s in ("magnitude", "random")}
  assert all(c.method == "inq" and c.inq.schedule[-1] == 1.0 for _, c in points)
  points = sweep.sweep_configs("ablation_inq_schedule", "digits", reduced=False)
  assert {tuple(c.inq.schedule) for _, c in points} == {
      (0.5, 0.75, 0.875, 1.0), (0.5, 1.0), (1.0,)}
  assert {c.inq.bits for _, c in points} == {5}


def test_comq_and_rtn_sweeps_cover_the_requested_grid():
  points = sweep.sweep_configs("ablation_comq", "digits", reduced=False)
  assert len(points) == 3 * 2 * 2 * 2 * 3
  assert {(c.comq.bits, c.comq.order, c.comq.iters, c.comq.scale_update)
          for _, c in points} == {(b, o, i, s) for b in (4, 3, 2)
                                  for o in ("greedy", "cyclic") for i in (1, 3)
                                  for s in (False, True)}
  assert all(c.method == "comq" and c.comq.grid == "asymmetric" for _, c in points)
  # Reduced: one factor changed at a time from the official recipe (greedy, 1, off).
  reduced = sweep.sweep_configs("ablation_comq", "digits", reduced=True)
  assert {(c.comq.order, c.comq.iters, c.comq.scale_update) for _, c in reduced} == {
      ("greedy", 1, False), ("cyclic", 1, False), ("greedy", 3, False),
      ("greedy", 1, True)}
  points = sweep.sweep_configs("ablation_rtn", "digits", reduced=False)
  assert {(c.rtn.grid, c.rtn.bits) for _, c in points} == {
      ("pow2", 5), ("pow2", 4), ("pow2", 3), ("pow2", 2),
      ("asymmetric", 4), ("asymmetric", 3), ("asymmetric", 2)}
  assert all(c.method == "rtn" for _, c in points) and len(points) == 7 * 3
  points = sweep.sweep_configs("ablation_ptq", "digits", reduced=False)
  solvers = {(c.method, c.comq.init, c[c.method].bits, c[c.method].granularity,
              c[c.method].group_size) for _, c in points}
  assert len(points) == 72 and len(solvers) == 24
  assert ("comq", "gptq", 2, "group", 64) in solvers
  assert ("gptq", "float", 3, "channel", None) in solvers


def test_vit_sweep_puts_both_models_side_by_side():
  points = sweep.sweep_configs("ablation_vit", "digits", reduced=False)
  assert len(points) == 2 * (2 + 2 * 3 * 2) * 3
  settings = {(c.model.name, c.method, c[c.method].bits if c.method != "fp" else 32,
               c[c.method].group_size if c.method in ("comq", "rtn") else None)
              for _, c in points}
  for model in ("SmallCNN", "ViTDigits"):
    assert {(model, "fp", 32, None), (model, "inq", 5, None)} <= settings
    assert {(model, method, bits, group_size) for method in ("comq", "rtn")
            for bits in (4, 3, 2) for group_size in (None, 32)} <= settings
  cnn, vit = configs.get_config("comq_4bit", "digits"), configs.get_config("fp_vit", "digits")
  for _, config in points:
    recipe = vit if config.model.name == "ViTDigits" else cnn
    assert (config.batch_size, config.fp) == (recipe.batch_size, recipe.fp)
    assert config.comq.scalar == 1.0 and config.comq.grid == config.rtn.grid == "asymmetric"
    assert tuple(config.inq.schedule) == (0.5, 0.75, 0.875, 1.0)
  with pytest.raises(ValueError, match="imagenet"):
    sweep.sweep_configs("ablation_vit", "imagenet", reduced=False)


def shortened_run(config, workdir):
  """The real job at CI cost: 3 FP epochs and one epoch per INQ step."""
  fields = {"fp.num_epochs": 3, "fp.lr_decay_epoch": 2, "inq.epochs_per_step": 1,
            "inq.lr_decay_epoch": 1, "num_devices": 1, "log_every_steps": 100,
            "checkpoint_every_steps": 1000}
  return train.train_and_evaluate(configs.apply_overrides(config, fields), workdir)


# One to two minutes each on 2 cores: run with `-m slow`.
@pytest.mark.integration
@pytest.mark.parametrize("name", [
    pytest.param("ablation_inq_partition", marks=pytest.mark.slow),
    pytest.param("ablation_comq", marks=pytest.mark.slow),
    pytest.param("ablation_ptq", marks=pytest.mark.slow)])
def test_reduced_sweep_runs_on_digits_and_is_reported(name, tmp_path):
  records = sweep.run_sweep(name, str(tmp_path), "digits", reduced=True,
                            train_fn=shortened_run)
  points = sweep.sweep_configs(name, "digits", reduced=True)
  assert [r["point"] for r in records] == [point for point, _ in points]
  assert all(r["status"] == "done" for r in records), records
  runs = report.load_runs(str(tmp_path))
  assert len(runs) == len(points)
  assert all(0.8 < run.results["fp_accuracy"] <= 1.0 for run in runs)  # chance: 0.1
  csv_path = report.write_report(str(tmp_path))["summary.csv"]
  with open(csv_path) as f:
    assert len(f.readlines()) == 1 + len(points)  # header + one group per point (1 seed)
