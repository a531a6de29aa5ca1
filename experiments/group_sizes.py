"""`python -m experiments.group_sizes --workdir=DIR`: layer error against group size.

COMQ (`comq_jax.comq`, default options: one greedy sweep from the float
weights) and round-to-nearest (`comq_jax.rtn`) on the asymmetric min-max
grid, per output channel and with one grid per group of 128, 64 or 32 consecutive
inputs, at 4, 3 and 2 bits:

1. random layers: correlated calibration inputs with a few outlier features and
   heavy-tailed weights; per layer the relative error ||XW - XW_q||_F / ||XW||_F;
2. digits models (`--models`, names in `experiments.models.MODELS`): the FP model of
   each seed, trained once by `train.train_and_evaluate` with the config `--config`
   (default "fp"), quantized with `comq_jax.quantize_model`; per layer the relative
   error on the calibration images, per model the mean of those and the test accuracy;
3. storage: bits per weight of the codes plus the grid parameters
   (`quant_core.grids.parameter_bytes`).

Writes DIR/group_sizes.csv (one row per layer or model and setting) and
DIR/group_sizes.md (tables, and every case where a smaller group has a higher error
than the next larger granularity). The FP runs live in DIR/fp/<model>_seed<seed>; a
second study in the same DIR reuses them.

Default study (about 10 min on 2 CPU cores, mostly compiling the digits models' layer
solves; docs/results/group_sizes/ holds its output):
  python -m experiments.group_sizes --workdir=workdirs/group_sizes
The digits ViT, with its own FP recipe (18 min; docs/results/group_sizes/vit/):
  python -m experiments.group_sizes --models=ViTDigits --config=fp_vit \
      --workdir=workdirs/group_sizes_vit
"""

import math
import os
import time
from typing import Callable, NamedTuple, Optional

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import comq_jax
from quant_core import paths as paths_lib
from quant_core import grids as grid_lib
import configs
from experiments import files
from experiments import logs
from experiments import models
from experiments import tasks
from experiments import train
from experiments.methods import post_training
from quant_core import layers
from quant_core.deploy import sizes

CSV_NAME = "group_sizes.csv"
REPORT_NAME = "group_sizes.md"
GRID = "asymmetric"
METHOD_LABELS = {"comq": "COMQ", "rtn": "RTN"}
SOLVERS = {"comq": comq_jax.comq, "rtn": comq_jax.rtn}
# Outlier features have this many times the standard deviation of the others.
OUTLIER_SCALE = 10.0
# Degrees of freedom of the Student-t weights: heavy tails, as trained layers have.
WEIGHT_DOF = 4
# A finer granularity counts as worse only above this relative increase, so that float32
# noise between identical grids (a group as large as the channel) is no case.
TOLERANCE = 1e-5
ALL_LAYERS = "all layers"
INTEGER_COLUMNS = ("group_size", "feature_groups", "d_in", "d_out", "grids_per_channel",
                   "packed_bytes")


class Settings(NamedTuple):
  """What the study runs; the defaults are the study in docs/results/group_sizes/.

  Attributes:
    shapes: ``(d_in, d_out)`` of each random layer.
    rows: calibration rows ``N`` of each random layer.
    outliers: outlier input features of each random layer.
    layer_seed: seed of the random layers (inputs and weights).
    bits: bit widths.
    group_sizes: inputs per grid; per-channel grids are always included.
    models: digits model names (keys of ``experiments.models.MODELS``); empty skips
      the digits part.
    seeds: FP training seeds of each digits model.
    config: the digits config of the FP training (a name in ``configs/``).
    config_overrides: dotted-path overrides of that config (``{"fp.num_epochs": 1}``).
  """
  shapes: tuple = ((256, 64), (512, 128), (1536, 384))
  rows: int = 1024
  outliers: int = 4
  layer_seed: int = 0
  bits: tuple = (4, 3, 2)
  group_sizes: tuple = (128, 64, 32)
  models: tuple = ("SmallCNN",)
  seeds: tuple = (0, 1, 2)
  config: str = "fp"
  config_overrides: Optional[dict] = None


def granularity_label(group_size):
  """"channel" for per-channel grids, else "g<group_size>"."""
  return "channel" if group_size is None else f"g{group_size}"


def granularities(group_sizes):
  """Per channel first, then the group sizes from the largest: coarse to fine."""
  return [None] + sorted(group_sizes, reverse=True)


def storage_bits(matrices, bits, group_size):
  """Bits of one quantized kernel: its codes plus the scales and zero points of its grids.

  Counted as `ModelQuantization.size_report` counts them
  (`quant_core.deploy.sizes.quantized_kernel_bytes`): the codes padded to whole bytes,
  and one grid per output channel (of each feature group) and group of ``group_size``
  of its ``d_in`` inputs.

  Args:
    matrices: ``(groups, d_in, d_out)`` of the layer's 2-D view (one matrix per feature
      group of a grouped conv).
    bits: code bits.
    group_size: inputs per grid, or None for one grid per output channel.

  Returns:
    The number of bits.
  """
  options = grid_options(bits, group_size)
  packed, _ = sizes.quantized_kernel_bytes(matrices, bits=bits, grid=options["grid"],
                                           granularity=options["granularity"],
                                           group_size=group_size)
  return 8 * packed


def grid_options(bits, group_size):
  """The grid settings shared by every solver (`comq_jax.comq`, `rtn`)."""
  return dict(bits=bits, grid=GRID, granularity="channel" if group_size is None else "group",
              group_size=group_size)


def random_layer(d_in, d_out, rows, outliers, seed):
  """Calibration inputs and weights of a random layer, float32.

  ``X = Z A`` with ``Z`` and ``A`` standard normal (``A`` scaled by ``1/sqrt(d_in)``), so
  the features are correlated; ``outliers`` random features are scaled by
  ``OUTLIER_SCALE``. The weights are Student-t (``WEIGHT_DOF``) over ``sqrt(d_in)``.
  Each shape draws from its own generator, so a layer does not depend on the others.

  Returns:
    ``(x, w)`` of shapes ``(rows, d_in)`` and ``(d_in, d_out)``.
  """
  rng = np.random.default_rng([seed, d_in, d_out])
  mixing = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
  x = rng.standard_normal((rows, d_in)) @ mixing
  x[:, rng.choice(d_in, outliers, replace=False)] *= OUTLIER_SCALE
  w = rng.standard_t(WEIGHT_DOF, (d_in, d_out)) / np.sqrt(d_in)
  return x.astype(np.float32), w.astype(np.float32)


def setting_fields(*, part, model, seed, layer, method, bits, group_size):
  """The columns that say which layer (or model, ``layer=ALL_LAYERS``) and setting a row is."""
  return {"part": part, "model": model, "seed": seed, "layer": layer, "method": method,
          "bits": bits, "granularity": granularity_label(group_size), "group_size": group_size}


def layer_row(setting, *, matrices, error, output_norm, seconds):
  """One layer's CSV row: its setting, sizes, errors and bits per weight.

  Args:
    setting: `setting_fields` of the row.
    matrices: ``(groups, d_in, d_out)`` of the layer's 2-D view.
    error: ``||XW - XW_q||_F``.
    output_norm: ``||XW||_F``.
    seconds: time of the solve.

  Returns:
    The row as a dict.
  """
  groups, d_in, d_out = matrices
  return {**setting, "feature_groups": groups, "d_in": d_in, "d_out": d_out,
          "grids_per_channel": grid_lib.num_groups(d_in, setting["group_size"]),
          "relative_error": error / output_norm, "error": error, "output_norm": output_norm,
          "bits_per_weight": (storage_bits(matrices, setting["bits"], setting["group_size"])
                              / math.prod(matrices)),
          "seconds": seconds}


def random_layer_rows(settings, progress):
  """Rows of the random layers: every shape, method, bit width and granularity."""
  rows = []
  for d_in, d_out in settings.shapes:
    x, w = random_layer(d_in, d_out, settings.rows, settings.outliers, settings.layer_seed)
    output_norm = float(np.linalg.norm(x.astype(np.float64) @ w))
    for bits in settings.bits:
      for group_size in granularities(settings.group_sizes):
        for method in METHOD_LABELS:
          solver = SOLVERS[method](**grid_options(bits, group_size))
          start = time.perf_counter()
          error = float(solver.quantize_layer(w, x).error)
          setting = setting_fields(part="random", model="random", seed=settings.layer_seed,
                                   layer=f"{d_in}x{d_out}", method=method, bits=bits,
                                   group_size=group_size)
          row = layer_row(setting, matrices=(1, d_in, d_out), error=error,
                          output_norm=output_norm, seconds=time.perf_counter() - start)
          rows.append(row)
          progress(row)
  return rows


def output_norms(model, variables, images, paths):
  """``||X_l W_l||_F`` of the layers ``paths`` over the calibration images.

  ``X_l W_l`` is the layer's output less its bias, with the FP model's inputs: the
  reference of the errors that `comq_jax.quantize_model` reports (inputs="fp"). Read
  from the outputs, so any layer kind whose bias is added last (Dense, DenseGeneral,
  Conv, Einsum) is measured alike.

  Args:
    model: the linen model.
    variables: its FP variables.
    images: the calibration batches.
    paths: ``/``-joined module paths, as in the layer reports.

  Returns:
    ``{path: norm}``.
  """
  squares = dict.fromkeys(paths, 0.0)

  def record(next_fun, args, kwargs, context):
    outputs = next_fun(*args, **kwargs)
    module = context.module
    path = paths_lib.path_name(module.path)
    if context.method_name == "__call__" and path in squares:
      linear = outputs
      if module.has_variable("params", "bias"):
        bias = module.get_variable("params", "bias")
        linear = outputs - bias.reshape((1,) * (outputs.ndim - bias.ndim) + bias.shape)
      squares[path] += float(jnp.sum(jnp.square(linear)))
    return outputs

  with nn.intercept_methods(record):
    for batch in images:
      model.apply(variables, batch, train=False)
  return {path: math.sqrt(square) for path, square in squares.items()}


class DigitsModel(NamedTuple):
  """A trained FP digits model and what a study quantizes it with.

  Attributes:
    model, variables: the linen model and its FP variables.
    images: the calibration batches of a comq/rtn run of the same seed.
    accuracy: ``variables -> test accuracy``.
    fp_accuracy: the FP model's test accuracy.
    norms: ``{path: ||X_l W_l||_F}`` of every linear layer (:func:`output_norms`).
  """
  model: nn.Module
  variables: dict
  images: list
  accuracy: Callable
  fp_accuracy: float
  norms: dict


def trained_digits_model(config_name, model_name, seed, workdir, overrides=None):
  """Trains (or reuses) the FP model of ``config_name`` in
  ``workdir/fp/<model>_seed<seed>`` and returns it as a :class:`DigitsModel`."""
  overrides = {"model.name": model_name, "seed": seed, **(overrides or {})}
  config = configs.apply_overrides(configs.get_config(config_name, "digits"), overrides)
  run_dir = os.path.join(workdir, "fp", f"{model_name}_seed{seed}")
  print(f"Training the FP {model_name} (seed {seed}) in {run_dir}", flush=True)
  train.train_and_evaluate(config, run_dir)
  variables = train.final_variables(run_dir)
  task = tasks.create_task(config)
  model, dataset = task.model, task.dataset
  eval_step = train.make_eval_step(task)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  accuracy = lambda v: train.evaluate(task, eval_step, v, dataset, config.eval_batch_size,
                                      device)
  # Phase 1's shuffle: the images a comq/rtn run of this seed calibrates on.
  images = post_training.calibration_inputs(config, task, dataset, (seed, 1, 0))
  norms = output_norms(model, variables, images,
                       layers.layer_paths(model, variables, images[0], train=False))
  return DigitsModel(model, variables, images, accuracy, accuracy(variables), norms)


def digits_rows(settings, model_name, seed, workdir, progress):
  """Rows of one digits model and seed: per layer and per model, every setting.

  Trains (or reuses) the FP model in ``workdir/fp/<model>_seed<seed>``, then quantizes
  it with each method, bit width and granularity on the calibration images a COMQ run
  of the same seed uses, and evaluates each quantized model on the test split.
  """
  model, variables, images, accuracy, fp_accuracy, norms = trained_digits_model(
      settings.config, model_name, seed, workdir, settings.config_overrides)
  rows = []
  for bits in settings.bits:
    for group_size in granularities(settings.group_sizes):
      for method in METHOD_LABELS:
        start = time.perf_counter()
        result = comq_jax.quantize_model(
            model, variables, images, SOLVERS[method](**grid_options(bits, group_size)),
            train=False)
        seconds = time.perf_counter() - start
        setting = dict(part="digits", model=model_name, seed=seed, method=method, bits=bits,
                       group_size=group_size)
        layer_rows = [layer_row(setting_fields(layer=layer.path, **setting),
                                matrices=layer.matrices, error=layer.error,
                                output_norm=norms[layer.path], seconds=layer.seconds)
                      for layer in result.layers]
        matrices = [layer.matrices for layer in result.layers]
        model_row = {
            **setting_fields(layer=ALL_LAYERS, **setting),
            "relative_error": float(np.mean([row["relative_error"] for row in layer_rows])),
            "bits_per_weight": (sum(storage_bits(m, bits, group_size) for m in matrices)
                                / sum(math.prod(m) for m in matrices)),
            "seconds": seconds, "accuracy": accuracy(result.variables),
            "fp_accuracy": fp_accuracy, "packed_bytes": result.size_report().packed_bytes}
        rows += layer_rows + [model_row]
        progress(model_row)
  return rows


def non_monotone_cases(table):
  """Every case where a smaller group has a higher error than the next larger granularity.

  Within each (part, model, seed, layer, method, bits) the granularities are ordered
  per channel, then by decreasing group size; a case is a step to the next finer one
  whose relative error rises by more than ``TOLERANCE`` (relative).

  Args:
    table: the study's rows (columns of `layer_row`; digits models have one
      row with ``layer=ALL_LAYERS``).

  Returns:
    A DataFrame, one row per case, with both granularities and errors.
  """
  keys = ["part", "model", "seed", "layer", "method", "bits"]
  ordered = table.assign(order=table["group_size"].fillna(np.inf)).sort_values(
      keys + ["order"], ascending=[True] * len(keys) + [False], kind="stable")
  cases = []
  for key, rows in ordered.groupby(keys, sort=False):
    labels, errors = list(rows["granularity"]), list(rows["relative_error"])
    for index in range(1, len(rows)):
      if errors[index] > errors[index - 1] * (1 + TOLERANCE):
        cases.append(dict(zip(keys, key, strict=True), finer=labels[index],
                          finer_error=errors[index], coarser=labels[index - 1],
                          coarser_error=errors[index - 1],
                          increase_percent=100 * (errors[index] / errors[index - 1] - 1)))
  columns = keys + ["finer", "finer_error", "coarser", "coarser_error", "increase_percent"]
  return pd.DataFrame(cases, columns=columns)


def comq_above_rtn(table):
  """Rows where COMQ's relative error exceeds RTN's on the same layer (or model) and grid."""
  keys = ["part", "model", "seed", "layer", "bits", "granularity"]
  errors = table.pivot_table(index=keys, columns="method", values="relative_error",
                             sort=False)
  worse = errors[errors["comq"] > errors["rtn"] * (1 + TOLERANCE)]
  return worse.reset_index().rename(columns={"comq": "COMQ", "rtn": "RTN"})


def granularity_table(rows, index, values, group_sizes, floatfmt):
  """Markdown table of ``values`` (mean over seeds), one column per granularity.

  Args:
    rows: study rows.
    index: the columns that label a table row, e.g. ``["layer", "bits"]``.
    values: the column shown.
    group_sizes: the study's group sizes; columns run from per channel to the smallest.
    floatfmt: format of the values, e.g. ``".4f"``.

  Returns:
    The table as Markdown text.
  """
  columns = [granularity_label(g) for g in granularities(group_sizes)]
  table = rows.pivot_table(index=index, columns="granularity", values=values,
                           aggfunc="mean", sort=False)
  return table[columns].reset_index().to_markdown(index=False, floatfmt=floatfmt)


def command_line(settings):
  """The command that runs ``settings`` (config overrides have no flag: listed apart)."""
  join = lambda values: ",".join(map(str, values))
  command = " ".join([
      "python -m experiments.group_sizes --workdir=DIR",
      f"--shapes={join(f'{d_in}x{d_out}' for d_in, d_out in settings.shapes)}",
      f"--rows={settings.rows} --outliers={settings.outliers}",
      f"--layer_seed={settings.layer_seed} --bits={join(settings.bits)}",
      f"--group_sizes={join(settings.group_sizes)} --models={join(settings.models)}",
      f"--seeds={join(settings.seeds)} --config={settings.config}"])
  if settings.config_overrides:
    command += f" (and config overrides {settings.config_overrides})"
  return command


def markdown_report(table, settings, seconds):
  """The study's Markdown report: settings, tables, non-monotone cases, notes."""
  random_rows = table[table["part"] == "random"]
  digits = table[table["part"] == "digits"]
  model_rows = digits[digits["layer"] == ALL_LAYERS]
  layer_rows = digits[digits["layer"] != ALL_LAYERS]
  sizes = settings.group_sizes
  shapes = ", ".join(f"{d_in}x{d_out}" for d_in, d_out in settings.shapes)
  lines = [
      "# Layer error against group size: COMQ and round-to-nearest", "",
      f"Study of `experiments/group_sizes.py`; {seconds / 60:.1f} min wall time. "
      f"Asymmetric min-max grid, bits {list(settings.bits)}, per output channel and "
      f"groups of {sorted(sizes, reverse=True)} consecutive inputs. COMQ is "
      "`comq_jax.comq` with its default options (one greedy sweep starting "
      "from the float weights, no scale update); RTN rounds every weight to the nearest "
      "point of the same grid.", "",
      f"Command: `{command_line(settings)}`", "",
      "**Relative error** of a layer: ||XW - XW_q||_F / ||XW||_F, with X the layer's "
      "calibration inputs (im2col patches for a conv) and XW its output without bias. "
      "**Model error**: the mean of the relative errors of the layers `quantize_model` "
      "quantizes (all its linear layers), with the FP model's inputs. **Bits/weight**: "
      "the codes plus each grid's scale and zero point "
      f"(`quant_core.grids.parameter_bytes`: {grid_lib.parameter_bytes(GRID, 1)} bytes per "
      "grid), over the quantized weights, counted as `size_report()` counts them.", "",
      "A group of at least d_in inputs is the whole channel: its grid, and so its error, "
      "are the per-channel ones.", ""]
  if not random_rows.empty:
    lines += [
        "## Random layers", "",
        f"Layers {shapes}; seed {settings.layer_seed}; X = Z A with Z ({settings.rows} x "
        "d_in) and A (d_in x d_in) standard normal, A / sqrt(d_in), then "
        f"{settings.outliers} random features x{OUTLIER_SCALE:g}; W Student-t "
        f"({WEIGHT_DOF} degrees of freedom) / sqrt(d_in).", ""]
    for method, label in METHOD_LABELS.items():
      lines += [f"{label} relative error:", "", granularity_table(
          random_rows[random_rows["method"] == method], ["layer", "bits"], "relative_error",
          sizes, ".4f"), ""]
    lines += ["Bits per weight (codes + grid parameters):", "", granularity_table(
        random_rows[random_rows["method"] == "comq"], ["layer", "bits"], "bits_per_weight",
        sizes, ".3f"), ""]
  if not model_rows.empty:
    seeds = ", ".join(map(str, settings.seeds))
    fp = model_rows.groupby(["model", "seed"])["fp_accuracy"].first().reset_index()
    lines += [
        "## Digits models", "",
        f"FP models trained by `train.train_and_evaluate` with config `{settings.config}` "
        f"on the digits data, seeds {seeds} (tables: mean over seeds); quantized by "
        "`comq_jax.quantize_model` on the calibration images of a comq/rtn run of the "
        "same seed; accuracy on the test split.", "",
        "FP test accuracy:", "", fp.to_markdown(index=False, floatfmt=".4f"), ""]
    for values, title, floatfmt in (("relative_error", "mean relative layer error", ".4f"),
                                    ("accuracy", "test accuracy", ".4f")):
      for method, label in METHOD_LABELS.items():
        lines += [f"{label} {title}:", "", granularity_table(
            model_rows[model_rows["method"] == method], ["model", "bits"], values,
            sizes, floatfmt), ""]
    lines += ["Bits per quantized weight (codes + grid parameters, all kernels):", "",
              granularity_table(model_rows[model_rows["method"] == "comq"],
                                ["model", "bits"], "bits_per_weight",
                                sizes, ".3f"), ""]
    for method, label in METHOD_LABELS.items():
      lines += [f"{label} relative error per layer:", "", granularity_table(
          layer_rows[layer_rows["method"] == method].astype({"d_in": int}),
          ["model", "layer", "d_in", "bits"], "relative_error", sizes, ".4f"), ""]
  cases = non_monotone_cases(table)
  same = table[(table["grids_per_channel"] == 1) & table["group_size"].notna()]
  lines += [
      "## Non-monotone cases", "",
      "Every step from a granularity to the next finer one ("
      f"{' -> '.join(granularity_label(g) for g in granularities(sizes))}) where the "
      "relative error rises by more than "
      f"{TOLERANCE:g} (relative), per layer and, for the digits models, also for the "
      "model's mean error. Smaller groups are expected to help, but a group's min-max "
      "grid does not refine the channel's (its levels are not a superset), so this is not "
      "a theorem.", "",
      f"{len(cases)} case(s)." if len(cases) else "None.", ""]
  if len(cases):
    lines += [cases.to_markdown(index=False, floatfmt=".4f"), ""]
  if not same.empty:
    whole = same.groupby(["model", "layer"], sort=False)["granularity"].unique()
    lines += ["Groups that are the whole channel (group size >= d_in; errors equal to "
              "the per-channel ones):", "",
              whole.map(", ".join).reset_index().to_markdown(index=False), ""]
  above = comq_above_rtn(table)
  lines += ["## COMQ above RTN", "",
            "Settings where COMQ's relative error exceeds RTN's on the same grid (COMQ "
            "starts from the float weights, not from RTN's solution, so it is not bound "
            "to beat RTN):", "",
            above.to_markdown(index=False, floatfmt=".4f") if len(above) else "None.", ""]
  return "\n".join(lines)


def run_study(workdir, settings=None):
  """Runs the study and writes `CSV_NAME` and `REPORT_NAME` into ``workdir``.

  Args:
    workdir: output directory; the FP training runs go to ``workdir/fp/``.
    settings: what to run (see :class:`Settings`); None runs the defaults.

  Returns:
    The study's rows as a DataFrame: `layer_row`'s columns; a digits model's row
    (``layer=ALL_LAYERS``) has the mean relative layer error, the kernels' bits per
    weight, accuracy, fp_accuracy and packed_bytes (``size_report``).
  """
  settings = settings or Settings()
  unknown = sorted(set(settings.models) - set(models.MODELS))
  if unknown:
    raise ValueError(f"Unknown models {unknown}; expected names in {sorted(models.MODELS)}.")
  os.makedirs(workdir, exist_ok=True)
  start = time.time()

  def progress(row):
    print(f"[{time.time() - start:6.0f}s] {row['model']} {row['layer']} "
          f"{METHOD_LABELS[row['method']]} {row['bits']}-bit {row['granularity']}: "
          f"relative error {row['relative_error']:.4f}, "
          f"{row['bits_per_weight']:.3f} bits/weight", flush=True)

  rows = random_layer_rows(settings, progress)
  for model_name in settings.models:
    for seed in settings.seeds:
      rows += digits_rows(settings, model_name, seed, workdir, progress)
  table = pd.DataFrame(rows)
  seconds = time.time() - start
  # Integer columns that model rows leave empty: written as integers, not 128.0.
  csv = table.astype({column: "Int64" for column in INTEGER_COLUMNS if column in table})
  files.write_atomically(os.path.join(workdir, CSV_NAME),
                         csv.to_csv(index=False, lineterminator="\n"))
  files.write_atomically(os.path.join(workdir, REPORT_NAME),
                         markdown_report(table, settings, seconds))
  print(f"Study took {seconds:.0f} s; wrote {CSV_NAME} and {REPORT_NAME} to {workdir}")
  return table


def parse_shape(text):
  """"256x64" -> (256, 64)."""
  d_in, d_out = text.lower().split("x")
  return int(d_in), int(d_out)


def define_flags():
  """Defines the command-line flags (only when run as a program)."""
  defaults = Settings()
  flags.DEFINE_string("workdir", None, "Output directory (CSV, report, FP runs).",
                      required=True)
  flags.DEFINE_list("models", list(defaults.models),
                    f"Digits models, names in experiments.models.MODELS "
                    f"({', '.join(sorted(models.MODELS))}); empty skips the digits part.")
  flags.DEFINE_list("seeds", [str(seed) for seed in defaults.seeds],
                    "FP training seeds of each digits model.")
  flags.DEFINE_string("config", defaults.config,
                      "Digits config (name in configs/) of the FP training.")
  flags.DEFINE_list("shapes", [f"{d_in}x{d_out}" for d_in, d_out in defaults.shapes],
                    "Random layer shapes, d_inxd_out.")
  flags.DEFINE_integer("rows", defaults.rows, "Calibration rows of each random layer.")
  flags.DEFINE_integer("outliers", defaults.outliers,
                       "Outlier input features of each random layer.")
  flags.DEFINE_integer("layer_seed", defaults.layer_seed, "Seed of the random layers.")
  flags.DEFINE_list("bits", [str(bits) for bits in defaults.bits], "Bit widths.")
  flags.DEFINE_list("group_sizes", [str(size) for size in defaults.group_sizes],
                    "Inputs per grid (per-channel grids are always included).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.hide_orbax_logs()
  options = flags.FLAGS
  settings = Settings(
      shapes=tuple(parse_shape(shape) for shape in options.shapes), rows=options.rows,
      outliers=options.outliers, layer_seed=options.layer_seed,
      bits=tuple(int(bits) for bits in options.bits),
      group_sizes=tuple(int(size) for size in options.group_sizes),
      models=tuple(options.models), seeds=tuple(int(seed) for seed in options.seeds),
      config=options.config)
  run_study(options.workdir, settings)


if __name__ == "__main__":
  define_flags()
  app.run(main)
