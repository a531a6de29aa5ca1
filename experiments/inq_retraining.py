"""`python -m experiments.inq_retraining --workdir=DIR`: INQ accuracy against retraining.

For each digits model, seed, bit width, option and number of retraining epochs per INQ
step, runs the INQ recipe of `configs/inq_<bits>bit.py` (the paper's ResNet-18 schedule
for that width; the ViT through `configs.fp_vit.use_vit`) from one shared FP model per
model and seed, and tabulates the final test accuracy. Options (`OPTIONS`, the fields
of config.inq documented in configs/base.py):

  plain         the paper's recipe
  compensation  (a) newly frozen values by coordinate descent and (b) the damped
                least-squares correction of the free weights, from calibration Grams
  distillation  CE + 1 * 4^2 * KL(teacher || student), the FP model as teacher
  sensitivity   frozen counts shared among layers by sensitivity (power 1)
  all           the three together

and, for the ternary diagnosis (`--options` to select them):

  final_epochs  1 epoch per step of training what INQ leaves in float after the final
                step (biases, BatchNorm scales and shifts)
  bn_recal      BatchNorm running statistics re-estimated after the final step
  recipe        the configs/inq_2bit_compensated.py recipe

Writes DIR/inq_retraining.csv (one row per run), DIR/inq_retraining.md (mean ± std over
seeds; codebook fractions; the zero fraction of every layer at 2 bits) and
DIR/inq_retraining.png (accuracy against epochs per step, one panel per model and
bit width). FP runs live in DIR/fp/<model>_seed<seed>, each point in
DIR/<model>/<bits>bit_<option>_e<epochs>_seed<seed>; rerunning skips finished points.

Default study (docs/results/inq_retraining/ holds its output and time):
  python -m experiments.inq_retraining --workdir=workdirs/inq_retraining
"""

import itertools
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
from matplotlib import figure as mpl_figure
import pandas as pd

import configs
from configs import fp_vit
from experiments import files
from experiments import logs
from experiments import report
from experiments import train

CSV_NAME = "inq_retraining.csv"
REPORT_NAME = "inq_retraining.md"
PLOT_NAME = "inq_retraining.png"
COMPENSATION = {"inq.compensation.choose": True, "inq.compensation.correct": True}
DISTILLATION = {"inq.distill_alpha": 1.0, "inq.distill_temperature": 4.0}
SENSITIVITY = {"inq.sensitivity_power": 1.0}
OPTIONS = {
    "plain": {},
    "compensation": COMPENSATION,
    "distillation": DISTILLATION,
    "sensitivity": SENSITIVITY,
    "all": {**COMPENSATION, **DISTILLATION, **SENSITIVITY},
    "final_epochs": {"inq.final_epochs": 1},
    "bn_recal": {"inq.bn_recalibration_batches": 42},
    "recipe": None,  # configs/inq_2bit_compensated.py, whatever the bit width asked
}
DEFAULT_OPTIONS = ("plain", "compensation", "distillation", "sensitivity", "all")
FP_CONFIGS = {"SmallCNN": "fp", "ViTDigits": "fp_vit"}


def point_config(model, bits, option, epochs, seed):
  """The config of one point of the study."""
  if option == "recipe":
    config = configs.get_config("inq_2bit_compensated", "digits")
  else:
    config = configs.apply_overrides(configs.get_config(f"inq_{bits}bit", "digits"),
                                     OPTIONS[option])
  if model == "ViTDigits":
    config = fp_vit.use_vit(config)
  elif model != "SmallCNN":
    raise ValueError(f"Unknown model {model!r}; expected one of {sorted(FP_CONFIGS)}.")
  overrides = {"seed": seed, "inq.epochs_per_step": epochs}
  if option == "final_epochs" or option == "recipe":
    overrides["inq.final_epochs"] = min(epochs, 1)
  return configs.apply_overrides(config, overrides)


def fp_variables(workdir, model, seed):
  """Trains (or reuses) the FP model of `model` and `seed`; returns its variables."""
  config = configs.apply_overrides(configs.get_config(FP_CONFIGS[model], "digits"),
                                   {"seed": seed})
  run_dir = os.path.join(workdir, "fp", f"{model}_seed{seed}")
  if not os.path.exists(os.path.join(run_dir, "results.json")):
    print(f"Training the FP {model} (seed {seed}) in {run_dir}", flush=True)
    train.train_and_evaluate(config, run_dir)
  return train.final_variables(run_dir)


def run_point(workdir, model, bits, option, epochs, seed, fp):
  """results.json of one point (run now, or read back from an earlier run)."""
  run_dir = os.path.join(workdir, model, f"{bits}bit_{option}_e{epochs}_seed{seed}")
  path = os.path.join(run_dir, "results.json")
  if not os.path.exists(path):
    train.train_and_evaluate(point_config(model, bits, option, epochs, seed), run_dir,
                             fp_variables=fp)
  with open(path) as f:
    return json.load(f)


def study_rows(workdir, models, seeds, bits_list, options, epochs_list):
  rows, start = [], time.time()
  for model, seed in itertools.product(models, seeds):
    fp = fp_variables(workdir, model, seed)
    for bits, option, epochs in itertools.product(bits_list, options, epochs_list):
      results = run_point(workdir, model, bits, option, epochs, seed, fp)
      rows.append(dict(model=model, bits=bits, option=option, epochs=epochs, seed=seed,
                       fp_accuracy=results["fp_accuracy"],
                       accuracy=results["final_accuracy"],
                       codebook_fraction=results["codebook_fraction"],
                       before_final_step=results["portion_accuracies"][-2]["accuracy"],
                       zero_fractions=json.dumps(results["zero_fractions"])))
      print(f"[{time.time() - start:6.0f}s] {model} seed {seed} {bits}-bit {option} "
            f"{epochs} epochs/step: accuracy {results['final_accuracy']:.4f} "
            f"(FP {results['fp_accuracy']:.4f})", flush=True)
  return pd.DataFrame(rows)


def mean_std(values):
  mean, std = report.mean_std(list(values))
  return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_report(table, seconds, command):
  lines = ["# INQ accuracy against retraining epochs per step", "",
           f"`{command}` ({seconds / 60:.0f} min in the invocation that wrote this "
           "report; points already in the workdir are read back, not rerun). Test "
           "accuracy (%), "
           "mean ± sample std over seeds "
           f"{sorted(table.seed.unique().tolist())}; every run's codebook fraction is "
           f"{'1.0' if (table.codebook_fraction == 1.0).all() else 'NOT 1.0'} "
           f"(min {table.codebook_fraction.min():.6f}).", ""]
  for model, per_model in table.groupby("model", sort=False):
    fp = per_model.drop_duplicates("seed").fp_accuracy
    lines += [f"## {model}", "", f"FP: {mean_std(fp)}", ""]
    pivot = per_model.pivot_table(index=["bits", "option"], columns="epochs",
                                  values="accuracy", aggfunc=mean_std, sort=False)
    pivot.columns = [f"{epochs} epochs/step" for epochs in pivot.columns]
    lines += [pivot.reset_index().to_markdown(index=False), ""]
    low = per_model[per_model.bits == per_model.bits.min()]
    steps = low.groupby(["option", "epochs"], sort=False).agg(
        before_final_step=("before_final_step", mean_std), final=("accuracy", mean_std))
    lines += [f"Accuracy (%) at {per_model.bits.min()} bits after the last retrained "
              "portion and after the final step (which quantizes the rest and, unless "
              "final_epochs is set, trains nothing):", "",
              steps.reset_index().to_markdown(index=False), ""]
    zeros = pd.DataFrame([{**json.loads(row.zero_fractions), "option": row.option,
                           "epochs": row.epochs} for row in low.itertuples()])
    zeros = zeros.groupby(["option", "epochs"], sort=False).mean()
    lines += [f"Share of zero weights per layer at {per_model.bits.min()} bits (mean over "
              "seeds):", "", zeros.reset_index().to_markdown(index=False, floatfmt=".3f"),
              ""]
  return "\n".join(lines)


def plot(table, path):
  models, bits_list = table.model.unique(), sorted(table.bits.unique(), reverse=True)
  figure = mpl_figure.Figure(figsize=(4 * len(bits_list), 3.2 * len(models)))
  axes = figure.subplots(len(models), len(bits_list), squeeze=False)
  for (i, model), (j, bits) in itertools.product(enumerate(models), enumerate(bits_list)):
    ax = axes[i][j]
    part = table[(table.model == model) & (table.bits == bits)]
    for option, runs in part.groupby("option", sort=False):
      means = runs.groupby("epochs").accuracy.mean() * 100
      ax.plot(means.index, means.values, marker="o", label=option)
    ax.axhline(100 * table[table.model == model].fp_accuracy.mean(), color="k",
               linestyle="--", label="FP")
    ax.set_title(f"{model}, {bits}-bit")
    ax.set_xlabel("retraining epochs per step")
    ax.set_ylabel("test accuracy (%)")
  axes[0][-1].legend(fontsize="small")
  report.save_figure(figure, path)


def run_study(workdir, models, seeds, bits_list, options, epochs_list, command):
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"Unknown options {unknown}; expected names in {list(OPTIONS)}.")
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  table = study_rows(workdir, models, seeds, bits_list, options, epochs_list)
  seconds = time.time() - start
  files.write_atomically(os.path.join(workdir, CSV_NAME),
                         table.to_csv(index=False, lineterminator="\n"))
  files.write_atomically(os.path.join(workdir, REPORT_NAME),
                         markdown_report(table, seconds, command))
  plot(table, os.path.join(workdir, PLOT_NAME))
  print(f"Study took {seconds:.0f} s; wrote {CSV_NAME}, {REPORT_NAME} and {PLOT_NAME} "
        f"to {workdir}")
  return table


def define_flags():
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_list("models", ["SmallCNN"], f"Digits models: {sorted(FP_CONFIGS)}.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (FP training and INQ).")
  flags.DEFINE_list("bits", ["5", "4", "3", "2"], "INQ bit widths.")
  flags.DEFINE_list("options", list(DEFAULT_OPTIONS), f"Options: {list(OPTIONS)}.")
  flags.DEFINE_list("epochs", ["0", "1", "4"], "Retraining epochs per INQ step.")
  flags.DEFINE_string("compilation_cache", None,
                      "Directory of JAX's persistent compilation cache (points share "
                      "their programs); default DIR/jax_cache.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.hide_orbax_logs()
  logging.set_verbosity(logging.WARNING)
  options = flags.FLAGS
  jax.config.update("jax_compilation_cache_dir", options.compilation_cache
                    or os.path.join(options.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  command = "python -m experiments.inq_retraining " + " ".join(
      [f"--workdir={options.workdir}"] + [f"--{name}={','.join(options[name].value)}"
                                           for name in ("models", "seeds", "bits",
                                                        "options", "epochs")])
  run_study(options.workdir, options.models, [int(s) for s in options.seeds],
            [int(b) for b in options.bits], options.options,
            [int(e) for e in options.epochs], command)


if __name__ == "__main__":
  define_flags()
  app.run(main)
