"""`python -m experiments.ptq_study_lm --workdir=DIR`: the low-bit study matrix on a language
model, every cell from one Gram capture.

The matrix of `experiments.ptq_study` on an imported language model (Gemma 3 270M by
default): methods {RTN, GPTQ, GPTQ act-order with static groups, COMQ as the official code,
COMQ+ (3 sweeps and scale updates), COMQ+ from GPTQ's solution, COMQ+ from act-order
GPTQ's} x {none, MagR} x bits {3, 2, 4} x {groups of 128, per channel}, asymmetric min-max
grids, perplexity on the held-out windows of the job config (`--config`, default
`llm_ptq_gemma`: 128 calibration windows of 128 tokens). With `--mixed`, mixed precision
at `--budgets` bits per weight (COMQ+ per layer, widths chosen on round-to-nearest layer
objectives from the Grams, or on the Fisher-weighted loss increase).

With inputs from the FP model (`inputs="fp"`), a layer's Gram does not depend on the other
layers' solutions, and MagR's result depends only on the Gram, the weights and the
granularity (not on the bits or the method). So each calibration seed captures the Grams
once, MagR runs once per granularity and layer, and each cell solves every layer from them
with the solver's own programs: the weights are those of `comq_jax.quantize_model` with
`inputs="fp"` and the same calibration windows (tested). A cell then costs its solves and
one evaluation, not a model load, a capture and a MagR solve.

Every finished cell is appended to DIR/cells.jsonl at once (an interrupted study resumes
from it; a cell is never measured twice), with its perplexity, the summed layer objective
sum_l ||X_l W_l - X_l Q_l||_F^2 against the original weights, and its solve seconds. The
report DIR/ptq_study_lm.md pivots them.

  python -m experiments.ptq_study_lm --workdir=workdirs/ptq_study_lm \\
      "--mixed=COMQ+ mixed-gram,COMQ+ mixed-fisher"
"""

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
import re
import time
from typing import NamedTuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import comq_jax
import quant_core
from comq_jax import bit_allocation
from comq_jax import objective
from experiments import files
from experiments import logs
from experiments import tasks
from experiments import train
from experiments.methods import post_training
from quant_core import paths as paths_lib

CELLS_NAME = "cells.jsonl"
REPORT_NAME = "ptq_study_lm.md"
BEST_COMQ = dict(iters=3, scale_update=True)
# label -> (factory, options) of each method of the matrix.
METHODS = {
    "RTN": (comq_jax.rtn, {}),
    "GPTQ": (comq_jax.gptq, {}),
    "GPTQ act-order": (comq_jax.gptq, dict(act_order=True, static_groups=True)),
    "COMQ": (comq_jax.comq, {}),
    "COMQ+": (comq_jax.comq, BEST_COMQ),
    "COMQ+ from GPTQ": (comq_jax.comq, dict(BEST_COMQ, init="gptq")),
    "COMQ+ from GPTQ act-order": (comq_jax.comq, dict(BEST_COMQ, init="gptq-act-order")),
}
# Mixed precision: a method of METHODS per layer at widths from BIT_CHOICES chosen by the
# exact knapsack on round-to-nearest layer objectives: label -> (method, how the
# objectives are measured: "gram", the layer objective from the Grams; "fisher", the
# loss increase to second order with the diagonal empirical Fisher of the calibration
# windows). Their cells' "bits" are budgets in bits per weight with the grid parameters
# as stored.
MIXED_METHODS = {
    "COMQ+ mixed-gram": ("COMQ+", "gram"),
    "COMQ+ mixed-fisher": ("COMQ+", "fisher"),
    "COMQ+ from GPTQ act-order mixed-fisher": ("COMQ+ from GPTQ act-order", "fisher"),
}
BIT_CHOICES = (2, 3, 4, 8)
# Layers solved at a time (each solve keeps about one core busy).
SOLVES_IN_FLIGHT = 2
# The job config whose model, data and calibration the study uses, by default.
DEFAULT_CONFIG = "llm_ptq_gemma"


class Settings(NamedTuple):
  """What the study runs (defaults: the study of docs/ptq-study.md)."""
  seeds: tuple = (0,)
  bits: tuple = (3, 2, 4)
  group_sizes: tuple = (128, None)
  methods: tuple = tuple(METHODS)
  magr: tuple = (False, True)
  # Mixed precision (MIXED_METHODS) at budgets of bits per weight, grid parameters
  # included: at groups of 128, 3.5 is uniform W3's size and 3.0 uniform W2 g64's.
  mixed: tuple = ()
  budgets: tuple = (3.5, 3.0)
  mixed_group_size: int = 128


def granularity_label(group_size):
  return "channel" if group_size is None else f"g{group_size}"


def make_solver(label, bits, group_size, preprocess=None):
  """The solver of ``label`` (:data:`METHODS`) on the asymmetric min-max grid."""
  factory, options = METHODS[label]
  return factory(bits, granularity="channel" if group_size is None else "group",
                 group_size=group_size, preprocess=preprocess, **options)


def cells(settings):
  """``(seed, group_size, bits, method, magr)`` of every cell, in run order: per seed and
  granularity, MagR's preprocessing is computed once and shared; mixed precision (bits:
  the budget; groups of ``mixed_group_size`` only) follows the matrix of its seed and
  granularity."""
  return [cell for seed, group_size in itertools.product(settings.seeds, settings.group_sizes)
          for cell in (list(itertools.product([seed], [group_size], settings.bits,
                                              settings.methods, settings.magr))
                       + list(itertools.product(
                           [seed], [group_size], settings.budgets,
                           settings.mixed if group_size == settings.mixed_group_size else (),
                           settings.magr)))]


def cell_key(seed, group_size, bits, method, magr):
  return f"seed={seed},{granularity_label(group_size)},w{bits:g},{method},magr={magr}"


class CalibratedModel:
  """A language model's layers, their FP-input Grams on one calibration sample, and the
  perplexity of any weights of those layers.

  Args:
    task: a `experiments.tasks.LanguageModeling` task (model, data, evaluation).
    config: its job config (calibration settings, evaluation batch size).
    variables: the FP model's variables ``{"params": ...}``.
    seed: the calibration seed: the job's calibration windows of ``config.seed = seed``.
  """

  def __init__(self, task, config, variables, seed):
    self.task, self.config, self.variables = task, config, variables
    # The post-training job's order of training windows (its phase index is 1).
    calibration = post_training.calibration_inputs(config, task, task.dataset, (seed, 1, 0))
    model, _ = task.bound(variables)
    start = time.perf_counter()
    self.grams = {path: np.asarray(accumulator.gram)
                  for path, accumulator in quant_core.layer_grams(model, None,
                                                                  calibration).items()}
    self.capture_seconds = time.perf_counter() - start
    self.views = {path: view for path, view in
                  quant_core.layer_views(model, None, calibration[0]).items()
                  if view is not None and path in self.grams}
    # An untied head stays in float, as in the job (task.float_rules).
    floats = [pattern for pattern, solver in task.float_rules() if solver is None]
    self.paths = [path for path in self.views
                  if not any(re.fullmatch(pattern, path) for pattern in floats)]
    self.kernels = {path: paths_lib.get(variables["params"], path.split("/"))["kernel"]
                    for path in self.paths}
    self._eval_step = train.make_eval_step(task)
    self._seed, self._fisher = seed, None

  def fisher(self):
    """``{path: (groups, d_in, d_out)}`` diagonal empirical Fisher of the next-token loss
    over the calibration windows, one window at a time (computed once)."""
    if self._fisher is None:
      examples = post_training.fisher_examples(self.config, self.task, self.task.dataset,
                                               (self._seed, 1, 0))
      kernel_fisher = bit_allocation.fisher_diagonal(
          post_training.task_loss(self.task, self.variables), self.variables["params"],
          examples, self.paths)
      self._fisher = {path: self.views[path].matrices(values)
                      for path, values in kernel_fisher.items()}
    return self._fisher

  def matrices(self, path):
    """``(groups, d_in, d_out)`` float weights of a layer's 2-D view."""
    kernel = self.kernels[path]
    return jnp.asarray(self.views[path].matrices(kernel)).astype(
        objective.compute_dtype(kernel.dtype))

  def perplexity(self, kernels):
    """Held-out perplexity with ``{path: kernel}`` in place of the FP kernels."""
    params = jax.tree.map(lambda leaf: leaf, self.variables["params"])
    for path, kernel in kernels.items():
      paths_lib.get(params, path.split("/"))["kernel"] = kernel
    variables = dict(self.variables, params=params)
    counts = np.zeros(2)
    for batch in self.task.dataset.eval_batches(self.config.eval_batch_size):
      counts += [float(count) for count in self._eval_step(variables, batch)]
    return self.task.summarize(counts)


@functools.lru_cache(maxsize=None)
def _preprocess_fn(solver):
  return jax.jit(lambda wt, gram: solver.preprocessed(wt, gram))


@functools.lru_cache(maxsize=None)
def _solve_fn(solver):
  """``(w, target_t, gram) -> (weights, objective, positive definite)`` of one matrix:
  ``solver`` (without preprocessing) on the channel-major ``target_t``, the objective
  against the original ``w`` (d_in, d_out)."""

  def solve(w, target_t, gram):
    qt, codes, g, error, history, positive = solver.solve_weights(target_t, gram)
    result = solver.layer_result(w, qt, codes, g, error, history)
    error = objective.reconstruction_error(w, qt.T, gram.astype(w.dtype))
    return result.weights, error ** 2, positive
  return jax.jit(solve)


def magr_targets(model, group_size, executor):
  """``{path: [channel-major weights after MagR, per feature group]}`` at one
  granularity (the settings of ``preprocess="magr"``; any bit width)."""
  magr_solver = make_solver("RTN", 4, group_size, preprocess="magr")
  preprocess = _preprocess_fn(magr_solver)

  def one(path):
    gram = model.grams[path]
    return [preprocess(w.T, jnp.asarray(h))
            for w, h in zip(model.matrices(path), gram, strict=True)]
  return dict(zip(model.paths, executor.map(one, model.paths), strict=True))


def mixed_solvers(model, group_size, budget, mixed_method, targets=None):
  """The solvers of ``mixed_method`` (:data:`MIXED_METHODS`) at the widths that the
  knapsack chooses for ``budget`` bits per weight, from round-to-nearest objectives of
  the FP weights, or of MagR's ``targets``. Returns ``({path: solver}, allocation)``."""
  method, sensitivity = MIXED_METHODS[mixed_method]
  matrices = {path: model.matrices(path) if targets is None else
              jnp.stack([target.T for target in targets[path]]) for path in model.paths}
  probe = make_solver("RTN", max(BIT_CHOICES), group_size)
  if sensitivity == "gram":
    triple = bit_allocation.objectives_from_grams(model.grams, matrices, probe, BIT_CHOICES)
  else:
    triple = bit_allocation.objectives_from_fisher(model.fisher(), matrices, probe,
                                                   BIT_CHOICES)
  allocation = bit_allocation.allocate_bits(*triple, budget=budget)
  base = make_solver(method, max(BIT_CHOICES), group_size)
  return ({path: dataclasses.replace(base, bits=bits) for path, bits in
           allocation.bits.items()}, allocation)


def solve_cell(model, solver, targets, executor):
  """Every layer of ``model`` by ``solver`` (no preprocessing; or ``{path: solver}``)
  from ``targets`` (MagR's weights) or the FP weights. Returns ``({path: kernel},
  summed objective, seconds)``."""
  solver_of = solver if isinstance(solver, dict) else dict.fromkeys(model.paths, solver)

  def one(path):
    solve = _solve_fn(solver_of[path])
    gram = model.grams[path]
    outputs = []
    for index, (w, h) in enumerate(zip(model.matrices(path), gram, strict=True)):
      target = w.T if targets is None else targets[path][index]
      outputs.append(solve(w, target, jnp.asarray(h)))
    weights, errors, positive = zip(*outputs, strict=True)
    if not all(bool(flag) for flag in positive):
      raise FloatingPointError(f"{path}: the Gram is not positive definite for {solver}.")
    kernel = model.views[path].kernel(jnp.stack(weights)).astype(model.kernels[path].dtype)
    return kernel, sum(float(error) for error in errors)

  start = time.perf_counter()
  results = list(executor.map(one, model.paths))
  seconds = time.perf_counter() - start
  kernels = {path: kernel for path, (kernel, _) in zip(model.paths, results, strict=True)}
  return kernels, sum(value for _, value in results), seconds


def read_cells(workdir):
  """The cells measured so far, ``{key: row}``."""
  path = os.path.join(workdir, CELLS_NAME)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {row["key"]: row for row in rows}


def run(task, config, variables, settings, workdir, progress=print):
  """Measures every cell of ``settings`` not yet in ``workdir``; returns the table."""
  os.makedirs(workdir, exist_ok=True)
  done = read_cells(workdir)
  todo = [cell for cell in cells(settings) if cell_key(*cell) not in done]
  fp_perplexity = None
  with concurrent.futures.ThreadPoolExecutor(SOLVES_IN_FLIGHT) as executor:
    for seed, seed_cells in itertools.groupby(todo, key=lambda cell: cell[0]):
      model = CalibratedModel(task, config, variables, seed)
      if fp_perplexity is None:
        fp_perplexity = model.perplexity({})
      progress(f"seed {seed}: Grams of {len(model.paths)} layers in "
               f"{model.capture_seconds:.0f} s; FP perplexity {fp_perplexity:.4f}")
      for group_size, group_cells in itertools.groupby(seed_cells, key=lambda cell: cell[1]):
        group_cells = list(group_cells)
        targets, magr_seconds = None, None
        if any(cell[4] for cell in group_cells):
          start = time.perf_counter()
          targets = magr_targets(model, group_size, executor)
          magr_seconds = time.perf_counter() - start
          progress(f"seed {seed} {granularity_label(group_size)}: MagR in "
                   f"{magr_seconds:.0f} s")
        for cell in group_cells:
          _, _, bits, method, magr = cell
          extra = {}
          if method in MIXED_METHODS:
            solver, allocation = mixed_solvers(model, group_size, bits, method,
                                               targets if magr else None)
            widths = list(allocation.bits.values())
            extra = dict(average_bits=allocation.average_bits, widths=widths,
                         layers_per_width={str(b): widths.count(b) for b in BIT_CHOICES})
          else:
            solver = make_solver(method, bits, group_size)
          kernels, value, seconds = solve_cell(model, solver, targets if magr else None,
                                               executor)
          row = dict(key=cell_key(*cell), seed=seed, granularity=granularity_label(group_size),
                     bits=bits, method=method, magr=magr, objective=value,
                     perplexity=model.perplexity(kernels), fp_perplexity=fp_perplexity,
                     solve_seconds=seconds,
                     magr_seconds=magr_seconds if magr else None, **extra)
          files.append_jsonl(os.path.join(workdir, CELLS_NAME), row)
          done[row["key"]] = row
          progress(f"{row['key']}: perplexity {row['perplexity']:.4g}, objective "
                   f"{value:.4g}, {seconds:.0f} s")
  table = pd.DataFrame(list(done.values()))
  files.write_atomically(os.path.join(workdir, REPORT_NAME), markdown_report(table))
  return table


def markdown_report(table):
  """Per granularity, perplexity and summed objective with methods as rows and
  (bits, MagR) as columns, then the mixed-precision cells; means over the calibration
  seeds (a cell measured on several seeds says how many)."""
  lines = ["# Low-bit study on a language model", "",
           "Asymmetric min-max grids, inputs from the FP model. Objective: "
           "sum_l ||X_l W_l - X_l Q_l||_F^2 against the original weights. Cells measured "
           "on several calibration seeds give their mean and (n).", ""]
  if table.empty:
    return "\n".join(lines)
  lines += [f"FP perplexity {table['fp_perplexity'].iloc[0]:.4f}.", ""]
  matrix = table[~table["method"].isin(list(MIXED_METHODS))]
  for granularity in dict.fromkeys(matrix["granularity"]):
    rows = matrix[matrix["granularity"] == granularity]
    for value in ("perplexity", "objective"):
      lines += [f"## {granularity}: {value}", "", _pivot(rows, value), ""]
  mixed = table[table["method"].isin(list(MIXED_METHODS))]
  if not mixed.empty:
    columns = ["granularity", "bits", "method", "average_bits", "perplexity", "objective",
               "layers_per_width"]
    mixed = mixed.assign(layers_per_width=[
        " / ".join(f"{count}" for count in counts.values())
        for counts in mixed["layers_per_width"]])
    lines += ["## Mixed precision (budget in bits per weight; layers at "
              + " / ".join(str(bits) for bits in BIT_CHOICES) + " bits)", "",
              mixed[columns].to_markdown(index=False, floatfmt=".4g"), ""]
  return "\n".join(lines)


def _pivot(rows, value):
  """Methods as rows, "W<bits> none" and "W<bits> MagR" as columns."""
  cells_text = {}
  for (method, bits, magr), group in rows.groupby(["method", "bits", "magr"], sort=False):
    mean = group[value].mean()
    count = group["seed"].nunique()
    cells_text[(method, bits, magr)] = f"{mean:.4g}" + (f" ({count})" if count > 1 else "")
  methods = [m for m in METHODS if m in set(rows["method"])]
  bits_order = list(dict.fromkeys(rows["bits"]))
  columns = [(bits, magr) for bits in bits_order for magr in (False, True)
             if any((m, bits, magr) in cells_text for m in methods)]
  header = "| method | " + " | ".join(f"W{bits:g} {'MagR' if magr else 'none'}"
                                     for bits, magr in columns) + " |"
  lines = [header, "|" + "---|" * (len(columns) + 1)]
  for method in methods:
    lines.append(f"| {method} | " + " | ".join(cells_text.get((method, *column), "")
                                              for column in columns) + " |")
  return "\n".join(lines)


def define_flags():
  """Defines the command-line flags (only when run as a program)."""
  defaults = Settings()
  flags.DEFINE_string("workdir", None, "Output directory (cells.jsonl, report).",
                      required=True)
  flags.DEFINE_string("config", DEFAULT_CONFIG, "Job config module under configs/ (an "
                      "imported language model).")
  flags.DEFINE_list("seeds", [str(seed) for seed in defaults.seeds], "Calibration seeds.")
  flags.DEFINE_list("bits", [str(bits) for bits in defaults.bits], "Bit widths.")
  flags.DEFINE_list("group_sizes", ["channel" if size is None else str(size)
                                    for size in defaults.group_sizes],
                    "Granularities: group sizes, or 'channel'.")
  flags.DEFINE_list("methods", list(defaults.methods), f"Of {list(METHODS)}.")
  flags.DEFINE_list("magr", ["none", "magr"], "'none' and/or 'magr'.")
  flags.DEFINE_list("mixed", list(defaults.mixed), f"Mixed precision, of {list(MIXED_METHODS)}.")
  flags.DEFINE_list("budgets", [f"{budget:g}" for budget in defaults.budgets],
                    "Mixed-precision budgets, bits per weight with the grid parameters.")


def settings_from_flags(options):
  unknown = sorted(set(options.methods) - set(METHODS))
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; allowed {list(METHODS)}.")
  unknown = sorted(set(options.mixed) - set(MIXED_METHODS))
  if unknown:
    raise app.UsageError(f"--mixed: unknown {unknown}; allowed {list(MIXED_METHODS)}.")
  bad = sorted(set(options.magr) - {"none", "magr"})
  if bad:
    raise app.UsageError(f"--magr: unknown {bad}; allowed ['none', 'magr'].")
  try:
    return Settings(seeds=tuple(int(seed) for seed in options.seeds),
                    bits=tuple(int(bits) for bits in options.bits),
                    group_sizes=tuple(None if size == "channel" else int(size)
                                      for size in options.group_sizes),
                    methods=tuple(options.methods),
                    magr=tuple(value == "magr" for value in options.magr),
                    mixed=tuple(options.mixed),
                    budgets=tuple(float(budget) for budget in options.budgets))
  except ValueError as error:
    raise app.UsageError(f"--seeds, --bits and --group_sizes take integers (and "
                         f"'channel'), --budgets numbers: {error}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.hide_orbax_logs()
  options = flags.FLAGS
  settings = settings_from_flags(options)
  config_module = __import__(f"configs.{options.config}", fromlist=["get_config"])
  config = config_module.get_config("text")
  task = tasks.create_task(config)
  if not isinstance(task, tasks.LanguageModeling) or task.trains_fp:
    raise app.UsageError(f"--config={options.config}: the study needs a language model "
                         "with imported weights (config.model.name of a pretrained model).")
  variables = task.init_variables(None)
  run(task, config, variables, settings, options.workdir)
  print(f"Wrote {os.path.join(options.workdir, REPORT_NAME)}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
