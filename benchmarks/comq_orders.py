"""COMQ's visiting orders against GPTQ on one layer: error and time.

``order="greedy"`` (the official code) gives every output channel its own order, so a
sweep reads one Gram row per channel and coordinate (``4 d_out d_in^2`` bytes);
``"cyclic"`` and ``"diag"`` (descending ``H_ii``) share one order, and each block of
coordinates updates the residual with one matrix product, as GPTQ's lazy batches do.
Same weights, Gram (``benchmarks.gptq_official.layer_problem``: ``N`` correlated random
rows) and grid for every solver: 4-bit asymmetric, groups of 128; COMQ one sweep, GPTQ
blocks of 128 and 1% dampening. Times are medians of ``--repeats`` runs after a warm-up
call (compilation is the first call less the median).

Usage::

  python -m benchmarks.comq_orders --shapes=640x2048,2048x640,4096x4096 \\
      --out=benchmarks/results/comq_orders_cpu.json
"""

import argparse
import json
import statistics

import jax
import jax.numpy as jnp

import comq_jax
from benchmarks import gptq_official

SOLVERS = {
    "comq greedy": lambda: comq_jax.comq(4, order="greedy", granularity="group",
                                         group_size=128),
    "comq cyclic": lambda: comq_jax.comq(4, order="cyclic", granularity="group",
                                         group_size=128),
    "comq diag": lambda: comq_jax.comq(4, order="diag", granularity="group",
                                       group_size=128),
    "gptq": lambda: comq_jax.gptq(4, granularity="group", group_size=128),
}


def measure(shape, rows, repeats):
  d_in, d_out = shape
  w, gram = gptq_official.layer_problem(d_in, d_out, rows)
  w, gram = jnp.asarray(w), jnp.asarray(gram)
  row = {"d_in": d_in, "d_out": d_out}
  for name, make in SOLVERS.items():
    solver = make()
    run = lambda solver=solver: jax.block_until_ready(solver.quantize_layer(w, gram=gram))
    first, runs, result = gptq_official.timed(run, repeats)
    median = statistics.median(runs)
    row[name] = {"median_s": median, "compile_s": first - median, "runs_s": runs,
                 "error": float(result.error)}
    print(f"{d_in}x{d_out} {name:12s} {median:8.3f} s (first {first:7.2f} s) "
          f"error {float(result.error):.4f}", flush=True)
  gptq = row["gptq"]
  for name in ("comq greedy", "comq cyclic", "comq diag"):
    row[name]["error_vs_gptq"] = row[name]["error"] / gptq["error"]
    row[name]["time_vs_gptq"] = row[name]["median_s"] / gptq["median_s"]
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="640x2048,2048x640,4096x4096",
                      help="d_in x d_out list")
  parser.add_argument("--rows", type=int, default=2048, help="calibration rows N")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--note", default="")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  result = {"machine": gptq_official.machine(), "rows": args.rows, "repeats": args.repeats,
            "note": args.note, "layers": [measure(s, args.rows, args.repeats) for s in shapes]}
  print("ratios to GPTQ (error, time):")
  for row in result["layers"]:
    print(f"  {row['d_in']}x{row['d_out']}: " + "; ".join(
        f"{name} {row[name]['error_vs_gptq']:.3f}, {row[name]['time_vs_gptq']:.2f}x"
        for name in ("comq greedy", "comq cyclic", "comq diag")))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
