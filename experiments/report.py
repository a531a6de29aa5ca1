"""`python -m experiments.report --workdir=DIR`: tables and plots of every run under DIR.

Finds every results.json under DIR (recursively; each next to the config.json that
`train_and_evaluate` writes) and writes into DIR/report/:

  report.md              one table per config (sweep): mean ± sample std over seeds
  summary.csv            the same rows, machine-readable
  results.csv            one row per run
  accuracy_vs_bits.png   final test accuracy vs bits per method and setting; FP reference
                         (one panel per grid family, and per model when runs use several)
  inq_portions.png       INQ test accuracy after each accumulated portion

A config whose runs use several models (a sweep with a model axis) also gets a table of
the models side by side: accuracy by bits and grid, one column per model and method.

Runs are grouped by config name, method, bits and the config fields that vary between
runs of the same config (the sweep's axes; `seed` and `stop_after_steps` excepted), so
the seeds of one setting form one row.

`format_results` is the plain-text table of one run that the entry points print.
"""

import collections
import io
import json
import os

from absl import app
from absl import flags
from absl import logging
# Figure objects render without pyplot, so importing this module selects no backend.
from matplotlib import figure as mpl_figure
import numpy as np
import pandas as pd

from experiments import files
from experiments import llm_report
from experiments import methods

REPORT_DIR = "report"
# Fields that differ between runs of one setting: averaged over, never a group key.
IGNORED_FIELDS = ("seed", "stop_after_steps")


def method_label(method):
  """The registry's display label of `method` ("comq" -> "COMQ"); else the name itself."""
  return methods.REGISTRY[method].label if method in methods.REGISTRY else method


def format_results(results):
  """Formats the results dict of one run as a plain-text table.

  The task's metric (test accuracy, or perplexity for a language model) and sizes for
  every method, the INQ portions, the time of each phase, and the per-layer errors of
  post-training methods against round-to-nearest on the same grid.
  """
  bits = results["bits"]
  label = method_label(results["method"])
  if llm_report.is_language_model_results(results):
    rows = llm_report.perplexity_rows(results, label)
  else:
    rows = {"Full-precision test accuracy": f"{results['fp_accuracy']:.4f}"}
    for entry in results["portion_accuracies"]:
      rows[f"  after INQ portion {entry['portion']:g}"] = f"{entry['accuracy']:.4f}"
    if results["method"] != "fp":
      rows[f"Final {bits}-bit {label} test accuracy"] = (
          f"{results['final_accuracy']:.4f} "
          f"({100 * (results['final_accuracy'] - results['fp_accuracy']):+.2f} points)")
    if results["packed_accuracy"] is not None:
      rows["  packed codes through quantized_matmul"] = f"{results['packed_accuracy']:.4f}"
  if results["codebook_fraction"] is not None:
    rows["Weights in the power-of-two codebook"] = (
        f"{100 * results['codebook_fraction']:.2f}%")
  rows["Model size FP32"] = f"{results['fp32_bytes']:,} bytes"
  if results["method"] != "fp":
    rows[f"Model size packed ({bits}-bit kernels)"] = (
        f"{results['packed_bytes']:,} bytes "
        f"({results['fp32_bytes'] / results['packed_bytes']:.2f}x smaller)")
    rows["  information-theoretic (uniform codes)"] = (
        f"{results['codebook_bytes']:,.0f} bytes")
    if results["entropy_bytes"] is not None:
      rows["  empirical code entropy"] = f"{results['entropy_bytes']:,.0f} bytes"
    if results.get("packed_file_bytes") is not None:
      rows["Packed model file (packed_model.safetensors)"] = (
          f"{results['packed_file_bytes']:,} bytes (FP32 file "
          f"{results['fp32_file_bytes']:,} bytes, "
          f"{results['fp32_file_bytes'] / results['packed_file_bytes']:.2f}x smaller)")
  for part, seconds in results.get("seconds", {}).items():
    rows[f"Seconds: {part}"] = f"{seconds:.1f}"
  title = f"{results['config_name']} on {results['dataset']} ({results['model']})"
  with pd.option_context("display.max_colwidth", None, "display.width", None):
    lines = [title, "-" * len(title), pd.Series(rows).to_string()]
  if results["layers"]:
    layers = pd.DataFrame([{
        "layer": layer["path"], "shape": "x".join(map(str, layer["shape"])),
        label: f"{layer['error']:.4g}", "RTN": f"{layer['rtn_error']:.4g}",
        f"{label}/RTN": (f"{layer['error'] / layer['rtn_error']:.3f}"
                         if layer["rtn_error"] else "-"),
        "seconds": f"{layer['seconds']:.2f}"} for layer in results["layers"]])
    lines += ["", f"Per-layer error ||XW - XQ||_F on the calibration set ({bits}-bit):",
              layers.to_string(index=False)]
  return "\n".join(lines)


class Run(collections.namedtuple("Run", "path results config")):
  """One run: its directory, results.json and flattened config.json ({"inq.bits": 5})."""


class Group(collections.namedtuple("Group", "config_name method bits setting runs")):
  """The runs of one setting. setting: ((field, value), ...) of the varied fields."""


def flatten(tree, prefix=""):
  """{"inq": {"bits": 5}} -> {"inq.bits": 5}; lists become tuples (hashable)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = tuple(value) if isinstance(value, list) else value
  return flat


def load_runs(workdir):
  """Every run under `workdir` (sorted by path), skipping the report directory."""
  runs = []
  for root, dirs, file_names in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if d != REPORT_DIR)
    if "results.json" not in file_names:
      continue
    config_path = os.path.join(root, "config.json")
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"{root} has results.json but no config.json.")
    with open(os.path.join(root, "results.json")) as f:
      results = json.load(f)
    with open(config_path) as f:
      config = flatten(json.load(f))
    runs.append(Run(os.path.relpath(root, workdir), results, config))
  if not runs:
    raise FileNotFoundError(f"No results.json under {workdir}.")
  return runs


def varied_fields(runs):
  """Config fields whose values differ between `runs` (minus IGNORED_FIELDS and bits).

  Only fields present in every run count: a field added to the configs after some runs
  were made (their config.json lacks it) does not split the runs into groups.
  """
  fields = sorted(set.intersection(*(set(run.config) for run in runs)))
  return [field for field in fields
          if field not in IGNORED_FIELDS and not field.endswith(".bits")
          and len({run.config[field] for run in runs}) > 1]


def method_index(method):
  """Position of `method` in the registry's display order (unknown methods last)."""
  order = list(methods.REGISTRY)
  return order.index(method) if method in order else len(order)


def sort_key(group):
  return (group.config_name, method_index(group.method), group.method, -group.bits,
          str(group.setting))


def group_runs(runs):
  """Groups runs by (config name, method, bits, varied fields of that config)."""
  by_config = collections.defaultdict(list)
  for run in runs:
    by_config[run.results["config_name"]].append(run)
  groups = []
  for config_name, config_runs in by_config.items():
    fields = varied_fields(config_runs)
    by_setting = collections.defaultdict(list)
    for run in config_runs:
      setting = tuple((field, run.config[field]) for field in fields)
      by_setting[(run.results["method"], run.results["bits"], setting)].append(run)
    groups += [Group(config_name, method, bits, setting,
                     sorted(group, key=lambda run: run.results["seed"]))
               for (method, bits, setting), group in by_setting.items()]
  return sorted(groups, key=sort_key)


def mean_std(values):
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def group_stats(group):
  """{"fp": (mean, std), "final": ..., "delta": ...} in accuracy points (percent)."""
  fp = [100 * run.results["fp_accuracy"] for run in group.runs]
  final = [100 * run.results["final_accuracy"] for run in group.runs]
  return {"fp": mean_std(fp), "final": mean_std(final),
          "delta": mean_std(np.subtract(final, fp))}


def format_value(value):
  if isinstance(value, tuple):
    return ", ".join(format_value(v) for v in value)
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def format_mean_std(mean, std, count, signed=False):
  text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
  return text + (f" ± {std:.2f}" if count > 1 else "")


def setting_label(group, fields):
  """`strategy=random` for the given fields of a group's setting (short field names)."""
  values = dict(group.setting)
  return ", ".join(f"{field.split('.')[-1]}={format_value(values[field])}"
                   for field in fields)


def markdown_tables(groups):
  """One markdown table per config name."""
  sections = []
  for config_name in dict.fromkeys(group.config_name for group in groups):
    config_groups = [group for group in groups if group.config_name == config_name]
    fields = [field for field, _ in config_groups[0].setting]
    header = (["method", "bits"] + fields +
              ["seeds", "FP acc. (%)", "final acc. (%)", "Δ vs FP (points)"])
    lines = [f"### {config_name}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for group in config_groups:
      stats = group_stats(group)
      count = len(group.runs)
      seeds = ",".join(str(run.results["seed"]) for run in group.runs)
      cells = ([method_label(group.method), str(group.bits)] +
               [format_value(value) for _, value in group.setting] +
               [seeds, format_mean_std(*stats["fp"], count),
                format_mean_std(*stats["final"], count),
                format_mean_std(*stats["delta"], count, signed=True)])
      lines.append("| " + " | ".join(cells) + " |")
    sections.append("\n".join(lines))
  return "\n\n".join(sections)


POST_TRAINING = ("comq", "gptq", "rtn")


def grid_label(run):
  """The grid granularity of a post-training run: "channel", "layer" or "g<size>"."""
  block = run.results["method"]
  granularity = run.config[f"{block}.granularity"]
  if granularity == "group":
    return f"g{run.config[f'{block}.group_size']}"
  return granularity


def solver_label(run):
  """The method's label, marking COMQ started from GPTQ's solution."""
  label = method_label(run.results["method"])
  if run.results["method"] == "comq" and run.config.get("comq.init") == "gptq":
    return label + " from GPTQ"
  return label


def model_name(run):
  """The run's model (results.json "model"; "" for runs written before it was recorded)."""
  return run.results.get("model", "")


def side_by_side_tables(runs):
  """Per config with several post-training methods: a table of methods side by side.

  Rows: bits and granularity; per method, test accuracy (mean ± std over seeds) and
  the summed layer error sum_l ||X_l W_l - X_l Q_l||_F (mean over seeds), all methods
  on the same FP models, calibration images and grids. A config with several models
  has one column per model and method.
  """
  by_config = collections.defaultdict(list)
  for run in runs:
    if run.results["method"] in POST_TRAINING:
      by_config[run.results["config_name"]].append(run)
  several_models = {config_name: len({model_name(run) for run in config_runs}) > 1
                    for config_name, config_runs in by_config.items()}
  records = [{"config": config_name,
              "method": (f"{model_name(run)} " if several_models[config_name] else "")
                        + solver_label(run),
              "bits": run.results["bits"], "grid": grid_label(run),
              "accuracy": 100 * run.results["final_accuracy"],
              "error": sum(layer["error"] for layer in run.results["layers"])}
             for config_name, config_runs in by_config.items()
             if len({run.results["method"] for run in config_runs}) > 1
             for run in config_runs]
  sections = []
  if not records:
    return sections
  table = pd.DataFrame(records)
  for config_name, config_table in table.groupby("config", sort=False):
    stats = config_table.groupby(["bits", "grid", "method"], sort=False).agg(
        mean=("accuracy", "mean"), std=("accuracy", "std"), seeds=("accuracy", "size"),
        error=("error", "mean"))
    stats["cell"] = [f"{format_mean_std(row.mean, row.std, row.seeds)} ({row.error:.1f})"
                     for row in stats.itertuples()]
    pivot = stats["cell"].unstack("method").sort_index(ascending=[False, True])
    header = ["bits", "grid"] + list(pivot.columns)
    lines = [f"### {config_name}: methods side by side", "",
             "Test accuracy (%), mean ± std over seeds, and in parentheses the summed "
             "layer error (mean over seeds).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(bits), grid] + [cell if isinstance(cell, str)
                                                      else "" for cell in row]) + " |"
              for (bits, grid), row in pivot.iterrows()]
    sections.append("\n".join(lines))
  return sections


def models_grid_label(run):
  """Grid column of the models table: "float" (FP), "pow2" (INQ) or `grid_label`."""
  method = run.results["method"]
  if method in POST_TRAINING:
    label = grid_label(run)
    return f"pow2 {label}" if run.config.get(f"{method}.grid") == "pow2" else label
  return {"fp": "float", "inq": "pow2"}.get(method, "")


def model_tables(runs):
  """Per config whose runs use several models: the models side by side.

  Rows: bits and grid (float for FP, pow2 for INQ, the granularity of a post-training
  grid); one column per model and method, test accuracy mean ± std over seeds.
  """
  by_config = collections.defaultdict(list)
  for run in runs:
    by_config[run.results["config_name"]].append(run)
  sections = []
  for config_name, config_runs in by_config.items():
    model_names = list(dict.fromkeys(model_name(run) for run in config_runs))
    if len(model_names) < 2:
      continue
    records = [{"bits": run.results["bits"], "grid": models_grid_label(run),
                "column": f"{model_name(run)} {solver_label(run)}",
                "order": (model_names.index(model_name(run)),
                          method_index(run.results["method"]), solver_label(run)),
                "accuracy": 100 * run.results["final_accuracy"]} for run in config_runs]
    table = pd.DataFrame(records)
    columns = [record["column"] for record in sorted(
        {record["column"]: record for record in records}.values(),
        key=lambda record: record["order"])]
    stats = table.groupby(["bits", "grid", "column"], sort=False)["accuracy"].agg(
        ["mean", "std", "size"])
    stats["cell"] = [format_mean_std(row.mean, row.std, row.size)
                     for row in stats.itertuples()]
    pivot = stats["cell"].unstack("column").sort_index(ascending=[False, True])
    header = ["bits", "grid"] + columns
    lines = [f"### {config_name}: models side by side", "",
             "Test accuracy (%), mean ± std over seeds; grid: float (FP), pow2 (INQ's "
             "power-of-two set), per output channel or g<N> (groups of N inputs).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(bits), grid] + [
        cell if isinstance(cell, str) else "" for cell in row[columns]]) + " |"
              for (bits, grid), row in pivot.iterrows()]
    sections.append("\n".join(lines))
  return sections


def summary_rows(groups):
  fields = list(dict.fromkeys(field for group in groups for field, _ in group.setting))
  rows = []
  for group in groups:
    stats = group_stats(group)
    setting = dict(group.setting)
    row = {"config_name": group.config_name, "method": group.method, "bits": group.bits}
    row.update({field: format_value(setting[field]) if field in setting else ""
                for field in fields})
    row.update({"num_seeds": len(group.runs),
                "seeds": " ".join(str(run.results["seed"]) for run in group.runs)})
    for name, (mean, std) in stats.items():
      row[f"{name}_mean"], row[f"{name}_std"] = round(mean, 4), round(std, 4)
    rows.append(row)
  return rows


def run_rows(groups):
  fields = list(dict.fromkeys(field for group in groups for field, _ in group.setting))
  rows = []
  for group in groups:
    setting = dict(group.setting)
    for run in group.runs:
      row = {"path": run.path, "config_name": group.config_name, "method": group.method,
             "bits": group.bits, "seed": run.results["seed"]}
      row.update({field: format_value(setting[field]) if field in setting else ""
                  for field in fields})
      row.update({"fp_accuracy": run.results["fp_accuracy"],
                  "final_accuracy": run.results["final_accuracy"]})
      rows.append(row)
  return rows


def write_csv(path, rows):
  csv_text = pd.DataFrame(rows).to_csv(index=False, lineterminator="\n")
  files.write_atomically(path, csv_text)


def save_figure(figure, path):
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  files.write_atomically(path, buffer.getvalue(), mode="wb")


def grid_family(group):
  """"power-of-two" for INQ and pow2-grid runs, else "uniform"."""
  values = dict(group.runs[0].config)
  grid = "pow2" if group.method == "inq" else values.get(f"{group.method}.grid")
  return "power-of-two grid" if grid == "pow2" else "uniform grid"


def line_fields(groups):
  """Varied fields that tell lines apart: those not fixed by the bit width.

  In a bits x strategy sweep whose schedule follows the bits, the schedule is fixed by
  the bits and the strategy is not, so each strategy is one line across bit widths.
  """
  fields = [field for field, _ in groups[0].setting]
  kept = []
  for index, field in enumerate(fields):
    per_bits = collections.defaultdict(set)
    for group in groups:
      per_bits[group.bits].add(group.setting[index][1])
    if any(len(values) > 1 for values in per_bits.values()):
      kept.append(field)
  return kept


def in_model(group, model):
  """Whether `group` ran `model` (None: any model)."""
  return model is None or model_name(group.runs[0]) == model


def fp_reference(groups):
  """FP accuracy (%) of `groups`: mean ± std over seeds of each seed's mean FP accuracy
  (every run of a seed carries the same FP model's accuracy; counted once per seed)."""
  by_seed = collections.defaultdict(list)
  for group in groups:
    for run in group.runs:
      by_seed[run.results["seed"]].append(100 * run.results["fp_accuracy"])
  return mean_std([np.mean(values) for values in by_seed.values()])


def without_model_recipe(groups, fields):
  """`fields` less those that follow the model (one value per `model.name` among
  `groups`, e.g. each model's FP recipe), when the model is one of them."""
  if "model.name" not in fields:
    return fields
  def follows_model(field):
    values = collections.defaultdict(set)
    for group in groups:
      setting = dict(group.setting)
      values[setting["model.name"]].add(setting[field])
    return all(len(model_values) == 1 for model_values in values.values())
  return [field for field in fields if field == "model.name" or not follows_model(field)]


def plot_label(group, fields):
  """Method label and the fields that tell its lines apart, without `method` and the
  other quantizers' config blocks (a COMQ line shows comq.* only, not rtn.*)."""
  others = set(methods.REGISTRY) - {"fp", group.method}  # "fp" is also the FP training
  shown = [field for field in fields
           if field != "method" and field.split(".")[0] not in others]
  return " ".join(filter(None, [method_label(group.method), setting_label(group, shown)]))


def plot_accuracy_vs_bits(groups, path):
  """Final accuracy (mean ± std over seeds) vs bits; one panel per grid family.

  With runs of several models, one row of panels per model, each with the FP reference
  of its model. Returns False (and writes nothing) when there are no quantized runs.
  """
  quantized = [group for group in groups if group.method != "fp"]
  if not quantized:
    return False
  model_names = list(dict.fromkeys(model_name(group.runs[0]) for group in groups))
  rows = model_names if len(model_names) > 1 else [None]
  families = sorted({grid_family(group) for group in quantized})
  figure = mpl_figure.Figure(figsize=(6.5 * len(families), 4.8 * len(rows)))
  axes = figure.subplots(len(rows), len(families), squeeze=False, sharey="row")
  for row_axes, model in zip(axes, rows, strict=True):
    fp_mean, fp_std = fp_reference([group for group in groups if in_model(group, model)])
    for axis, family in zip(row_axes, families, strict=True):
      lines = collections.defaultdict(list)
      for config_name in dict.fromkeys(group.config_name for group in quantized):
        config_groups = [group for group in quantized
                         if group.config_name == config_name and in_model(group, model)]
        if not config_groups:
          continue
        fields = line_fields(config_groups)
        for group in config_groups:
          if grid_family(group) == family:
            lines[plot_label(group, fields)].append(group)
      for index, (label, line) in enumerate(sorted(lines.items())):
        line.sort(key=lambda group: group.bits)
        offset = 0.05 * (index - (len(lines) - 1) / 2)
        stats = [group_stats(group)["final"] for group in line]
        axis.errorbar([group.bits + offset for group in line], [s[0] for s in stats],
                      yerr=[s[1] for s in stats], marker="o", markersize=4, capsize=3,
                      label=label)
      axis.axhline(fp_mean, color="black", linestyle="--",
                   label=f"FP {fp_mean:.2f} ± {fp_std:.2f}")
      axis.set_title(f"{model}: test accuracy vs bits ({family})" if model
                     else f"Test accuracy vs bits ({family})")
      axis.set_xlabel("weight bits")
      axis.set_xticks(sorted({group.bits for group in quantized
                              if in_model(group, model)}))
      axis.grid(alpha=0.3)
      axis.legend(fontsize=7)
    row_axes[0].set_ylabel("final test accuracy (%), mean ± std over seeds")
  save_figure(figure, path)
  return True


def plot_inq_portions(groups, path):
  """INQ accuracy after each accumulated portion (0 = FP); one panel per config.

  Returns False (and writes nothing) when there are no INQ runs.
  """
  inq_groups = [group for group in groups if group.method == "inq"]
  if not inq_groups:
    return False
  config_names = list(dict.fromkeys(group.config_name for group in inq_groups))
  figure = mpl_figure.Figure(figsize=(6.5 * len(config_names), 4.8))
  axes = figure.subplots(1, len(config_names), squeeze=False)
  for axis, config_name in zip(axes[0], config_names, strict=True):
    config_groups = [group for group in inq_groups if group.config_name == config_name]
    fields = without_model_recipe(config_groups, line_fields(config_groups))
    for group in config_groups:
      portions = [0.0] + [entry["portion"]
                          for entry in group.runs[0].results["portion_accuracies"]]
      accuracies = np.array([[run.results["fp_accuracy"]] +
                             [entry["accuracy"]
                              for entry in run.results["portion_accuracies"]]
                             for run in group.runs]) * 100
      std = (accuracies.std(axis=0, ddof=1) if len(group.runs) > 1
             else np.zeros(accuracies.shape[1]))
      setting = dict(group.setting)
      label = " ".join(filter(None, [
          setting.get("model.name"), f"{group.bits}-bit",
          setting_label(group, [field for field in fields if field != "model.name"])]))
      axis.errorbar(portions, accuracies.mean(axis=0), yerr=std, marker="o",
                    markersize=4, capsize=3, label=label)
    axis.set_title(f"INQ accuracy after each portion ({config_name})")
    axis.set_xlabel("accumulated quantized portion (0 = full precision)")
    axis.set_ylabel("test accuracy (%), mean ± std over seeds")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  save_figure(figure, path)
  return True


def write_report(workdir):
  """Writes the report files into `workdir/report/`; returns their paths by name.

  A plot with nothing to show (no quantized runs, no INQ runs) is left out.
  """
  all_runs = load_runs(workdir)
  # Language-model runs have their own tables (perplexity); the rest are image runs.
  runs = [run for run in all_runs if not llm_report.is_language_model_run(run)]
  groups = group_runs(runs) if runs else []
  report_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(report_dir, exist_ok=True)
  paths = {name: os.path.join(report_dir, name)
           for name in ("report.md", "summary.csv", "results.csv")}
  write_csv(paths["summary.csv"], summary_rows(groups))
  write_csv(paths["results.csv"], run_rows(groups))
  images = []
  for name, title, plot in (
      ("accuracy_vs_bits.png", "Test accuracy vs bits", plot_accuracy_vs_bits),
      ("inq_portions.png", "INQ accuracy after each portion", plot_inq_portions)):
    if plot(groups, os.path.join(report_dir, name)):
      paths[name] = os.path.join(report_dir, name)
      images += [f"![{title}]({name})", ""]
  markdown = "\n".join([
      "# Results", "",
      f"{len(all_runs)} runs under `{workdir}`; "
      + ("test accuracy in percent" if runs else "held-out perplexity")
      + ", mean ± sample standard deviation over the seeds listed (no ± for one seed)"
      + ("; Δ is the mean over seeds of (final − FP) of the same run." if runs else "."),
      "",
      markdown_tables(groups), ""] + [section + "\n" for section in
                                       model_tables(runs) + side_by_side_tables(runs)
                                       + llm_report.tables(all_runs)]
      + images)
  files.write_atomically(paths["report.md"], markdown)
  logging.info("Report of %d runs in %d groups written to %s", len(runs), len(groups),
               report_dir)
  return paths


def define_flags():
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to another entry point does not define --workdir twice)."""
  flags.DEFINE_string("workdir", None, "Directory searched recursively for results.json.",
                      required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  paths = write_report(flags.FLAGS.workdir)
  with open(paths["report.md"]) as f:
    print(f.read())
  print(f"Report written to {os.path.dirname(paths['report.md'])}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
