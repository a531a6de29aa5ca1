"""Timing and result files shared by the kernel benchmarks."""

import json
import os
import statistics
import time

import jax

# Peak HBM bandwidth in bytes/s by jax device_kind (vendor data sheets).
PEAK_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 SXM": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 8.19e11,
    "TPU v5e": 8.19e11,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
}


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` after one compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bandwidth_share(bandwidth, peak) -> str:
  """``bandwidth`` as a percentage of ``peak``, or n/a without a peak."""
  return f"{100 * bandwidth / peak:5.1f}%" if peak else "  n/a"


def write_result(result: dict, benchmark: str, out_dir: str,
                 quick: bool) -> str:
  """Writes ``result`` to ``<out_dir>/<benchmark>_<device kind>[_quick].json``.

  Written whole, then renamed: an interrupted run leaves no partial JSON.

  Returns:
    The file's path.
  """
  os.makedirs(out_dir, exist_ok=True)
  name = result["device_kind"].replace(" ", "_").replace("/", "_")
  suffix = "_quick" if quick else ""
  path = os.path.join(out_dir, f"{benchmark}_{name}{suffix}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)
  return path
