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

``--gemma_blocks=0,9,17`` measures real layers instead: every linear layer of those
decoder blocks of Gemma 3 270M (extra llm-weights), with its Gram from 128 calibration
windows of 128 tokens of the FP model (as the language-model jobs calibrate), at
``--bits`` with groups of 128, each order with one sweep and with 3 sweeps and scale
updates, against GPTQ::

  python -m benchmarks.comq_orders --gemma_blocks=0,9,17 --bits=3 \\
      --out=benchmarks/results/comq_orders_gemma_cpu.json
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


ORDERS = ("greedy", "cyclic", "diag")


def gemma_grams(blocks, windows=128, window=128, batch=16):
  """``{path: (w, gram)}`` of every linear layer of ``blocks`` of Gemma 3 270M."""
  import quant_core  # noqa: PLC0415
  from benchmarks import llm_blockwise  # noqa: PLC0415
  from comq_jax import bit_allocation  # noqa: PLC0415

  model, batches = llm_blockwise.gemma_calibration(windows, window, batch)
  grams = quant_core.layer_grams(model, None, batches)
  matrices = bit_allocation.layer_matrices(model, None, batches[0])
  wanted = tuple(f"layers/{block}/" for block in blocks)
  return {path: (matrices[path][0], grams[path].gram[0]) for path in grams
          if path.startswith(wanted)}


def measure_real(path, w, gram, bits, repeats):
  """Each order (1 sweep; 3 sweeps and scale updates) against GPTQ on one real layer."""
  grid = dict(granularity="group", group_size=128)
  solvers = {"gptq": comq_jax.gptq(bits, **grid)}
  for order in ORDERS:
    solvers[f"comq {order}"] = comq_jax.comq(bits, order=order, **grid)
    solvers[f"comq {order} 3 sweeps + scales"] = comq_jax.comq(
        bits, order=order, iters=3, scale_update=True, **grid)
  w, gram = jnp.asarray(w), jnp.asarray(gram)
  row = {"path": path, "d_in": int(w.shape[0]), "d_out": int(w.shape[1])}
  for name, solver in solvers.items():
    run = lambda solver=solver: jax.block_until_ready(solver.quantize_layer(w, gram=gram))
    _, runs, result = gptq_official.timed(run, repeats)
    row[name] = {"median_s": statistics.median(runs), "error": float(result.error)}
  for name in solvers:
    row[name]["error_vs_gptq"] = row[name]["error"] / row["gptq"]["error"]
    row[name]["time_vs_gptq"] = row[name]["median_s"] / row["gptq"]["median_s"]
  print(f"{path} {row['d_in']}x{row['d_out']}: " + "; ".join(
      f"{name} {row[name]['error_vs_gptq']:.3f}" for name in solvers if name != "gptq"),
        flush=True)
  return row


def summarize(rows):
  """Per solver: the summed objective over the layers (sum of squared errors) relative to
  GPTQ's, the median time ratio, and the layers where it beats GPTQ."""
  names = [name for name in rows[0] if isinstance(rows[0][name], dict)]
  gptq = sum(row["gptq"]["error"] ** 2 for row in rows)
  return {name: {
      "objective_vs_gptq": sum(row[name]["error"] ** 2 for row in rows) / gptq,
      "median_time_vs_gptq": statistics.median(row[name]["time_vs_gptq"] for row in rows),
      "layers_below_gptq": sum(row[name]["error"] < row["gptq"]["error"] for row in rows),
      "layers": len(rows)} for name in names}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="640x2048,2048x640,4096x4096",
                      help="d_in x d_out list")
  parser.add_argument("--rows", type=int, default=2048, help="calibration rows N")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--note", default="")
  parser.add_argument("--out", default=None, help="JSON file to write")
  parser.add_argument("--gemma_blocks", default="",
                      help="decoder blocks of Gemma 3 270M to measure instead of shapes")
  parser.add_argument("--bits", type=int, default=3, help="bits of --gemma_blocks")
  args = parser.parse_args()
  if args.gemma_blocks:
    blocks = [int(block) for block in args.gemma_blocks.split(",")]
    layers = gemma_grams(blocks)
    rows = [measure_real(path, w, gram, args.bits, args.repeats)
            for path, (w, gram) in layers.items()]
    result = {"machine": gptq_official.machine(), "bits": args.bits, "group_size": 128,
              "blocks": blocks, "repeats": args.repeats, "note": args.note,
              "summary": summarize(rows), "layers": rows}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return
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
