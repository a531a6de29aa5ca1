"""Multi-process training: digits INQ 5-bit on 2 processes x 2 CPU devices, as on 2 hosts.

Every run is `python -m experiments.digits` in subprocesses, one per process, joined by
`jax.distributed` through a free localhost port (CPU collectives over gloo, JAX's default
on CPU) with JAX_NUM_CPU_DEVICES devices each. The tests share one uninterrupted 2 x 2
run, started together with its 1 x 4 counterpart.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import input_pipeline
from experiments import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Digits INQ 5-bit, short: batches of 64 (21 steps per epoch), two FP epochs, then the
# 50% INQ step trains one epoch and the final step quantizes the rest: 63 training steps.
SHORT_FLAGS = ["--config=inq_5bit", "--config.batch_size=64", "--config.fp.num_epochs=2",
               "--config.fp.lr_decay_epoch=1", "--config.inq.epochs_per_step=1",
               "--config.inq.lr_decay_epoch=1", "--config.inq.schedule=(0.5,1.0)",
               "--config.checkpoint_every_steps=10", "--config.log_every_steps=10"]
STEPS_PER_EPOCH = 1347 // 64
TIMEOUT_S = 600


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_run(workdir, num_processes, devices_per_process, *flags):
  """Starts the processes of one run in `workdir`; each logs to workdir + ".<i>.log"."""
  port = free_port()
  # Launcher variables of the suite's own environment (a SLURM job, say) would turn the
  # one-process run into one of several.
  launcher = {"JAX_COORDINATOR_ADDRESS"}.union(*main.LAUNCHER_VARIABLES)
  env = dict({k: v for k, v in os.environ.items() if k not in launcher},
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             JAX_NUM_CPU_DEVICES=str(devices_per_process),
             # As the suite (conftest.py): small programs, so compile less.
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  processes = []
  for index in range(num_processes):
    distributed = [] if num_processes == 1 else [
        f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
        f"--process_id={index}"]
    with open(f"{workdir}.{index}.log", "w") as log:
      processes.append(subprocess.Popen(
          [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}",
           *SHORT_FLAGS, *flags, *distributed],
          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return processes


def wait_for(*runs):
  """Waits for every process of `runs` (from start_run); a failure shows its log."""
  processes = [(workdir, index, process) for workdir, started in runs
               for index, process in enumerate(started)]
  try:
    for workdir, index, process in processes:
      if process.wait(timeout=TIMEOUT_S) != 0:
        with open(f"{workdir}.{index}.log") as log:
          pytest.fail(f"process {index} of the run in {workdir} failed:\n"
                      + log.read()[-5000:])
  finally:
    for _, _, process in processes:  # a process left waiting on a failed peer
      if process.poll() is None:
        process.kill()
        process.wait()


def run(workdir, num_processes, devices_per_process, *flags):
  wait_for((workdir, start_run(workdir, num_processes, devices_per_process, *flags)))


def final_checkpoint(workdir):
  """(state as NumPy arrays, progress) of the newest checkpoint, whichever devices and
  processes saved it (restored onto one device of this process)."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "progress": ocp.JsonCheckpointHandler()}) as manager:
    step = manager.latest_step()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=device),
                          manager.item_metadata(step)["state"].tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
  return jax.device_get(restored["state"]), restored["progress"]


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def read_metrics_if_any(workdir):
  """The records so far of a running job ([] before the first, or mid-write)."""
  try:
    return read_metrics(workdir)
  except (FileNotFoundError, json.JSONDecodeError):
    return []


def test_multi_process_launch_is_detected_from_flags_or_launcher(monkeypatch):
  for name in {"JAX_COORDINATOR_ADDRESS"}.union(*main.LAUNCHER_VARIABLES):
    monkeypatch.delenv(name, raising=False)
  assert not main.launched_as_several_processes(None, None, None)
  assert main.launched_as_several_processes("localhost:1234", 2, 0)
  slurm_step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
  for name, value in slurm_step.items():
    monkeypatch.setenv(name, value)
  assert not main.launched_as_several_processes(None, None, None)  # a one-task step
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert main.launched_as_several_processes(None, None, None)
  monkeypatch.delenv("SLURM_STEP_NODELIST")  # no job step: JAX would not detect SLURM
  assert not main.launched_as_several_processes(None, None, None)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  assert main.launched_as_several_processes(None, None, None)


def test_digits_processes_feed_the_blocks_of_the_same_global_batches():
  whole = input_pipeline.DigitsData(0.25, 0)
  parts = [input_pipeline.DigitsData(0.25, 0, index, 2) for index in range(2)]
  for name, batches in (("train", lambda data: data.train_epoch(64, (0, 1, 2), 3)),
                        ("eval", lambda data: data.eval_batches(256))):
    expected = list(batches(whole))
    shares = [list(batches(part)) for part in parts]
    assert len(shares[0]) == len(shares[1]) == len(expected), name
    for batch, first, second in zip(expected, *shares, strict=True):
      for key in batch:
        np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """The uninterrupted 2 processes x 2 devices run, started with 1 process x 4 devices."""
  root = tmp_path_factory.mktemp("distributed")
  two, one = str(root / "two_processes"), str(root / "one_process")
  wait_for((two, start_run(two, 2, 2)), (one, start_run(one, 1, 4)))
  return two, one


@pytest.mark.integration
def test_two_processes_match_one_process_with_four_devices(two_processes):
  two, one = two_processes
  # The same global batches, mesh and program; only the all-reduce of the gradients and
  # BatchNorm statistics runs partly over gloo, summing the 4 devices' parts in another
  # order. That rounds differently (float32 epsilon 1.2e-7) at each of the 63 steps, and
  # SGD carries it on; measured: the float leaves (BatchNorm, fc bias) up to 6.4e-7
  # apart. The tolerance of test_train.test_four_devices_match_one_device (rtol 1e-5,
  # atol 1e-6) covers it. The quantized kernels must match exactly: none of their
  # powers of two may round the other way.
  state_two, progress_two = final_checkpoint(two)
  state_one, progress_one = final_checkpoint(one)
  assert progress_two["phase"] == progress_one["phase"] == 3  # past fp, inq_0.5, inq_1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state_two["variables"], state_one["variables"])
  for layer, params in state_one["variables"]["params"].items():
    if "kernel" in params:
      np.testing.assert_array_equal(state_two["variables"]["params"][layer]["kernel"],
                                    params["kernel"], err_msg=layer)
  jax.tree.map(np.testing.assert_array_equal, state_two["method"], state_one["method"])
  # Process 0 alone wrote the metrics: the same records as the one-process run.
  columns = lambda records: [(r["type"], r["phase_name"], r["global_step"]) for r in records]
  assert columns(read_metrics(two)) == columns(read_metrics(one))
  results_two, results_one = read_results(two), read_results(one)
  # Evaluation counts every test image once over both processes; one near-tie argmax
  # may flip with the rounding above (one of 450 images).
  for key in ("fp_accuracy", "final_accuracy"):
    assert abs(results_two[key] - results_one[key]) <= 1 / 450 + 1e-12
  assert results_two["codebook_fraction"] == 1.0
  with open(f"{two}.1.log") as log:
    assert "[process 1/2] inq_0.5 step 10/21" in log.read()


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_killed_inside_an_inq_step_resume_bitwise(two_processes, tmp_path):
  uninterrupted, _ = two_processes
  workdir = str(tmp_path / "killed")
  # Logged and checkpointed every 2 steps, so that a kill can be timed from
  # metrics.jsonl and lands after finished checkpoints from inside the 50% INQ step.
  often = ["--config.log_every_steps=2", "--config.checkpoint_every_steps=2"]
  processes = start_run(workdir, 2, 2, *often)
  records = lambda: [r for r in read_metrics_if_any(workdir) if r["type"] == "train"]
  deadline = time.time() + TIMEOUT_S
  try:
    while not any(r["phase_name"] == "inq_0.5" and r["step_in_phase"] >= 8
                  for r in records()):
      assert all(p.poll() is None for p in processes), "a process ended before the kill"
      assert time.time() < deadline
      time.sleep(0.05)
  finally:
    for process in processes:  # both hosts go down at once
      process.send_signal(signal.SIGKILL)
      process.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  killed_at = records()[-1]["global_step"]
  assert killed_at < 2 * STEPS_PER_EPOCH + STEPS_PER_EPOCH  # inside the 50% step
  run(workdir, 2, 2, *often)
  resumed = [r for r in records() if r["global_step"] > killed_at]
  # The rerun resumed inside the 50% step: no FP training again.
  assert all(r["phase_name"] != "fp" for r in resumed)
  assert resumed[0]["phase_name"] == "inq_0.5"
  # Same processes, devices and collectives as the uninterrupted run: bitwise equal.
  expected, _ = final_checkpoint(uninterrupted)
  actual, _ = final_checkpoint(workdir)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)
  assert read_results(workdir) == read_results(uninterrupted)
