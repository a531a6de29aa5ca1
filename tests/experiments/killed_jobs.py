"""A job killed with SIGKILL mid-run, run again in its workdir, against an uninterrupted run
of the same command (shared by the image and language-model job tests)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from experiments import compare_runs
from experiments import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_job(module, workdir, flags):
  return subprocess.Popen(
      [sys.executable, "-m", module, f"--workdir={workdir}"] + flags,
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))


def train_records(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [r for r in map(json.loads, f) if r["type"] == "train"]
  except (FileNotFoundError, json.JSONDecodeError):
    return []


def kill_rerun_and_compare(module, flags, tmp_path, phase_name, kill_step):
  """Starts `python -m module` twice; SIGKILLs one once metrics.jsonl logs step
  `kill_step` of phase `phase_name`, reruns it in its workdir, and asserts that it ends
  as the uninterrupted run: results.json equal but for wall-clock seconds, the final
  checkpoints bitwise equal.

  Returns:
    ``(train records the rerun logged, its results)``.
  """
  reference_dir, killed_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
  reference = start_job(module, reference_dir, flags)
  killed = start_job(module, killed_dir, flags)
  deadline = time.time() + 300
  while not any(r["phase_name"] == phase_name and r["step_in_phase"] >= kill_step
                for r in train_records(killed_dir)):
    assert killed.poll() is None, f"the job ended before step {kill_step} of {phase_name}"
    assert time.time() < deadline
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not os.path.exists(os.path.join(killed_dir, "results.json"))
  steps_before_kill = len(train_records(killed_dir))
  assert start_job(module, killed_dir, flags).wait(timeout=300) == 0
  assert reference.wait(timeout=300) == 0
  with open(os.path.join(reference_dir, "results.json")) as f:
    expected_results = json.load(f)
  with open(os.path.join(killed_dir, "results.json")) as f:
    results = json.load(f)
  assert compare_runs.results_differences(results, expected_results) == []
  expected, _ = train.latest_checkpoint(reference_dir)
  actual, _ = train.latest_checkpoint(killed_dir)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)
  return train_records(killed_dir)[steps_before_kill:], results
