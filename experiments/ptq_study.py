"""`python -m experiments.ptq_study --workdir=DIR`: the low-bit PTQ study on digits models.

Every post-training option side by side on the same FP model, calibration images and
grids (asymmetric min-max):

* methods: round-to-nearest, GPTQ (blocks of 128, 1% dampening), COMQ as the official
  code (one greedy sweep), COMQ with 3 sweeps and scale updates, and the same started from
  GPTQ's solution;
* each without and with MagR preprocessing (`preprocess="magr"`, the paper's alpha and
  200 steps);
* bits {4, 3, 2} x granularity {per channel, groups of `--group_size` inputs};
* COMQ's visiting orders (greedy, cyclic, diag) at 3 sweeps with scale updates;
* mixed precision (`comq_jax.bit_allocation`): per-layer bits from {2, 3, 4, 8}, chosen
  by the exact knapsack over round-to-nearest objectives from the FP Grams, quantized
  with COMQ (3 sweeps and scale updates); the budgets (`--budgets`) are average code
  bits, i.e. the storage (grid parameters included) of uniform precision at that
  width, interpolated between integer widths: budget 3 has uniform 3-bit's size.

Per setting: the summed layer objective sum_l ||X_l W_l - X_l Q_l||_F^2 (inputs from the
FP model), the mean relative layer error ||XW - XQ||_F / ||XW||_F, the test accuracy
and the bits per weight. The FP runs live in DIR/fp/<model>_seed<seed> (reused by a
second study in the same DIR). Writes DIR/ptq_study.csv and DIR/ptq_study.md.

Default study (SmallCNN and ViTDigits, seed 0; docs/results/ptq_study/ holds its output):
  python -m experiments.ptq_study --workdir=workdirs/ptq_study
Gemma 3 270M's cells are the sweep configs/ptq_study_gemma.py (docs/ptq-study.md).
"""

import math
import os
import time
from typing import NamedTuple

from absl import app
from absl import flags
import numpy as np
import pandas as pd

import comq_jax
import quant_core
from comq_jax import bit_allocation
from experiments import files
from experiments import group_sizes
from experiments import logs

CSV_NAME = "ptq_study.csv"
REPORT_NAME = "ptq_study.md"
# FP config of each digits model.
MODEL_CONFIGS = {"SmallCNN": "fp", "ViTDigits": "fp_vit"}
BEST_COMQ = dict(iters=3, scale_update=True)
# label -> (factory, options) of each method of the matrix.
METHODS = {
    "RTN": (comq_jax.rtn, {}),
    "GPTQ": (comq_jax.gptq, {}),
    "COMQ": (comq_jax.comq, {}),
    "COMQ 3 sweeps + scales": (comq_jax.comq, BEST_COMQ),
    "COMQ from GPTQ 3 sweeps + scales": (comq_jax.comq, dict(BEST_COMQ, init="gptq")),
}
ORDERS = ("greedy", "cyclic", "diag")
BIT_CHOICES = (2, 3, 4, 8)


class Settings(NamedTuple):
  """What the study runs (defaults: the study in docs/results/ptq_study/)."""
  models: tuple = ("SmallCNN", "ViTDigits")
  seeds: tuple = (0,)
  bits: tuple = (4, 3, 2)
  group_size: int = 32
  budgets: tuple = (3.0, 2.5)


def grid_kwargs(bits, group_size):
  return dict(bits=bits, granularity="channel" if group_size is None else "group",
              group_size=group_size)


def granularity_label(group_size):
  return "channel" if group_size is None else f"g{group_size}"


def storage_budget(costs, weights, code_bits):
  """Bits per weight, grid parameters included, of ``code_bits`` average code bits:
  the storage of uniform ``code_bits`` (interpolated between the two nearest integer
  widths), so that mixed and uniform precision compare at equal size."""
  low, high = math.floor(code_bits), math.ceil(code_bits)
  fraction = code_bits - low
  total = sum(costs[path][low] + fraction * (costs[path][high] - costs[path][low])
              for path in costs)
  return total / sum(weights.values())


def measure(model, variables, images, solver, norms, accuracy, rules=None):
  """One quantization: summed objective, mean relative error, accuracy, bits/weight."""
  start = time.perf_counter()
  result = comq_jax.quantize_model(model, variables, images, solver, rules=rules,
                                   train=False)
  seconds = time.perf_counter() - start
  objective = sum(layer.error ** 2 for layer in result.layers)
  relative = np.mean([layer.error / norms[layer.path] for layer in result.layers])
  stored = sum(bit_allocation.layer_cost_bits(layer.matrices, layer.solver,
                                              layer.solver.bits) for layer in result.layers)
  weights = sum(math.prod(layer.matrices) for layer in result.layers)
  return {"objective": objective, "relative_error": float(relative),
          "accuracy": accuracy(result.variables), "bits_per_weight": stored / weights,
          "seconds": seconds}


def digits_rows(settings, model_name, seed, workdir, progress):
  """Rows of one digits model and seed: every cell of the matrix, orders, mixed."""
  model, variables, images, accuracy, fp_accuracy, norms = group_sizes.trained_digits_model(
      MODEL_CONFIGS[model_name], model_name, seed, workdir)
  base = dict(model=model_name, seed=seed, fp_accuracy=fp_accuracy)
  rows = []

  def add(row):
    rows.append(row)
    progress(row)

  grams = quant_core.layer_grams(model, variables, images, train=False)
  matrices = bit_allocation.layer_matrices(model, variables, images[0], train=False)
  for group_size in (None, settings.group_size):
    probe = comq_jax.rtn(**grid_kwargs(max(BIT_CHOICES), group_size))
    triple = bit_allocation.objectives_from_grams(grams, matrices, probe, BIT_CHOICES)
    for code_bits in settings.budgets:
      budget = storage_budget(triple[1], triple[2], code_bits)
      allocation = bit_allocation.allocate_bits(*triple, budget=budget)
      solver = comq_jax.comq(**grid_kwargs(3, group_size), **BEST_COMQ)
      widths = "/".join(str(allocation.bits[path]) for path in allocation.bits)
      add({**base, "part": "mixed",
           "method": f"COMQ 3 sweeps + scales, mixed {code_bits:g}", "magr": False,
           "bits": code_bits, "granularity": granularity_label(group_size),
           "widths": widths,
           **measure(model, variables, images, solver, norms, accuracy,
                     rules=allocation.rules(solver))})
  for bits in settings.bits:
    for group_size in (None, settings.group_size):
      grid = grid_kwargs(bits, group_size)
      for label, (factory, options) in METHODS.items():
        for preprocess in (None, "magr"):
          solver = factory(**grid, **options, preprocess=preprocess)
          add({**base, "part": "matrix", "method": label, "magr": preprocess is not None,
               "bits": bits, "granularity": granularity_label(group_size),
               **measure(model, variables, images, solver, norms, accuracy)})
      if bits == 3:
        for order in ORDERS:
          solver = comq_jax.comq(**grid, **BEST_COMQ, order=order)
          add({**base, "part": "orders", "method": f"COMQ {order}", "magr": False,
               "bits": bits, "granularity": granularity_label(group_size),
               **measure(model, variables, images, solver, norms, accuracy)})
  return rows


def markdown_report(table, settings, seconds):
  """The report: the matrix, MagR's effect, orders and mixed precision, per model."""
  lines = ["# Low-bit PTQ study on the digits models", "",
           f"`experiments/ptq_study.py`, {seconds / 60:.1f} min wall time. Models "
           f"{', '.join(settings.models)}, seeds {list(settings.seeds)} (tables: mean over "
           f"seeds); asymmetric min-max grids per channel and in groups of "
           f"{settings.group_size} inputs. Objective: the summed layer objective "
           "sum_l ||X_l W_l - X_l Q_l||_F^2 with the FP model's inputs; relative: the mean "
           "of ||XW - XQ||_F / ||XW||_F over the layers; accuracy on the test split.", ""]
  for model_name in settings.models:
    rows = table[table["model"] == model_name]
    if rows.empty:
      continue
    fp = rows["fp_accuracy"].mean()
    lines += [f"## {model_name} (FP accuracy {fp:.4f})", ""]
    matrix = rows[rows["part"] == "matrix"]
    matrix = matrix.assign(bits=[f"{bits:g}" for bits in matrix["bits"]])
    for value, fmt in (("objective", ".4g"), ("accuracy", ".4f")):
      pivot = matrix.pivot_table(index=["bits", "granularity", "method"], columns="magr",
                                 values=value, aggfunc="mean", sort=False)
      pivot.columns = ["none" if not magr else "MagR" for magr in pivot.columns]
      if value == "objective":
        pivot["MagR / none"] = pivot["MagR"] / pivot["none"]
      lines += [f"{value.capitalize()} without and with MagR:", "",
                pivot.reset_index().to_markdown(index=False, floatfmt=fmt), ""]
    worse = matrix.pivot_table(index=["bits", "granularity", "method"], columns="magr",
                               values="objective", aggfunc="mean", sort=False)
    worse = worse[worse[True] > worse[False]]
    lines += ["Cells where MagR raises the objective: "
              + (", ".join(f"{m} W{b} {g}" for b, g, m in worse.index) or "none") + ".", ""]
    for part, title in (("orders", "COMQ orders (3 sweeps + scales, 3 bits)"),
                        ("mixed", "Mixed precision (COMQ 3 sweeps + scales)")):
      subset = rows[rows["part"] == part]
      if subset.empty:
        continue
      columns = ["method", "granularity", "bits_per_weight", "objective", "accuracy"]
      if part == "mixed":
        columns.append("widths")
      subset = subset.groupby(["method", "granularity"], sort=False).agg(
          {c: "first" if c == "widths" else "mean" for c in columns[2:]}).reset_index()
      lines += [f"{title}:", "", subset[columns].to_markdown(index=False, floatfmt=".4g"),
                ""]
  return "\n".join(lines)


def run(settings, workdir):
  """Runs the study into ``workdir``; returns the table."""
  start = time.perf_counter()
  rows = []
  show = lambda row: print(
      f"{row['model']} seed {row['seed']} {row['method']} magr={row['magr']} "
      f"{row['bits']} {row['granularity']}: objective {row['objective']:.4g}, accuracy "
      f"{row['accuracy']:.4f}", flush=True)
  for model_name in settings.models:
    for seed in settings.seeds:
      rows += digits_rows(settings, model_name, seed, workdir, show)
      # Written after every model and seed: an interrupted study keeps what it measured.
      table = pd.DataFrame(rows)
      files.write_atomically(os.path.join(workdir, CSV_NAME), table.to_csv(index=False))
  files.write_atomically(os.path.join(workdir, REPORT_NAME),
                         markdown_report(table, settings, time.perf_counter() - start))
  return table


def define_flags():
  """Defines the command-line flags (only when run as a program)."""
  defaults = Settings()
  flags.DEFINE_string("workdir", None, "Output directory (CSV, report, FP runs).",
                      required=True)
  flags.DEFINE_list("models", list(defaults.models),
                    f"Digits models, of {sorted(MODEL_CONFIGS)}.")
  flags.DEFINE_list("seeds", [str(seed) for seed in defaults.seeds], "FP training seeds.")
  flags.DEFINE_list("bits", [str(bits) for bits in defaults.bits], "Bit widths.")
  flags.DEFINE_integer("group_size", defaults.group_size, "Inputs per group grid.")
  flags.DEFINE_list("budgets", [f"{budget:g}" for budget in defaults.budgets],
                    "Mixed-precision budgets, average bits per weight.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.hide_orbax_logs()
  options = flags.FLAGS
  settings = Settings(models=tuple(options.models),
                      seeds=tuple(int(seed) for seed in options.seeds),
                      bits=tuple(int(bits) for bits in options.bits),
                      group_size=options.group_size,
                      budgets=tuple(float(budget) for budget in options.budgets))
  unknown = sorted(set(settings.models) - set(MODEL_CONFIGS))
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; allowed {sorted(MODEL_CONFIGS)}.")
  os.makedirs(options.workdir, exist_ok=True)
  run(settings, options.workdir)
  print(f"Wrote {os.path.join(options.workdir, REPORT_NAME)}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
