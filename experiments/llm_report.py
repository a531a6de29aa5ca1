"""The language-model runs of a report (`experiments.report`): perplexity and quantization
time of each method side by side, per model.

A run is a language-model run when its results.json has ``fp_perplexity`` (written by
`experiments.llm`). Rows are the bit width and grid, columns the methods; a cell is the
perplexity (mean ± sample std over the seeds, when several) and its ratio to the FP
perplexity of the same runs.
"""

import collections

import numpy as np

from experiments import methods


# Methods from the simplest to the most elaborate.
COLUMN_ORDER = ("FP", "RTN", "RTN pow2", "GPTQ", "GPTQ act-order", "COMQ", "COMQ from GPTQ",
                "COMQ pow2", "INQ")


def is_language_model_results(results) -> bool:
  return "fp_perplexity" in results


def is_language_model_run(run) -> bool:
  return is_language_model_results(run.results)


def perplexity_rows(results, label) -> dict:
  """The perplexity rows of one run's printed table (`report.format_results`)."""
  fp, final, bits = results["fp_perplexity"], results["perplexity"], results["bits"]
  rows = {"Full-precision perplexity (held-out windows)": f"{fp:.4f}"}
  for entry in results["portion_perplexities"]:
    rows[f"  after INQ portion {entry['portion']:g}"] = f"{entry['perplexity']:.4f}"
  if results["method"] != "fp":
    rows[f"Final {bits}-bit {label} perplexity"] = f"{final:.4f} ({final / fp:.4f}x FP)"
  if results["packed_perplexity"] is not None:
    rows["  packed codes through quantized_matmul"] = f"{results['packed_perplexity']:.4f}"
  return rows


def method_column(run) -> str:
  """The method's label with the options that change what it is (act-order, a start
  from GPTQ, the power-of-two grid)."""
  method = run.results["method"]
  label = methods.REGISTRY[method].label if method in methods.REGISTRY else method
  config = run.config
  if method == "gptq" and config.get("gptq.act_order"):
    label += " act-order"
  if method == "comq" and config.get("comq.init") == "gptq":
    label += " from GPTQ"
  if method in ("comq", "gptq", "rtn") and config.get(f"{method}.grid") == "pow2":
    label += " pow2"
  return label


def setting_row(run) -> tuple:
  """(bits, grid) of a run: the grid "channel", "layer" or "g<size>"; FP is (32, "float")."""
  method = run.results["method"]
  if method not in ("comq", "gptq", "rtn"):
    return run.results["bits"], "float" if method == "fp" else method
  granularity = run.config[f"{method}.granularity"]
  grid = f"g{run.config[f'{method}.group_size']}" if granularity == "group" else granularity
  return run.results["bits"], grid


def _cell(values, fp_values) -> str:
  mean = float(np.mean(values))
  text = f"{mean:.2f}"
  if len(values) > 1:
    text += f" ± {float(np.std(values, ddof=1)):.2f}"
  return f"{text} ({mean / float(np.mean(fp_values)):.3f}x)"


def tables(runs) -> list:
  """Markdown sections: per model, perplexity by setting and method, then the seconds
  each method took to quantize (mean over seeds)."""
  by_model = collections.defaultdict(list)
  for run in runs:
    if is_language_model_run(run):
      by_model[run.results["model"]].append(run)
  sections = []
  for model, model_runs in by_model.items():
    cells = collections.defaultdict(list)
    seconds = collections.defaultdict(list)
    fp_values = [run.results["fp_perplexity"] for run in model_runs]
    for run in model_runs:
      key = (setting_row(run), method_column(run))
      cells[key].append(run.results["perplexity"])
      quantize = sum(value for part, value in run.results.get("seconds", {}).items()
                     if part.endswith("/quantize"))
      seconds[key].append(quantize)
    found = {column for _, column in cells}
    columns = [c for c in COLUMN_ORDER if c in found] + sorted(found - set(COLUMN_ORDER))
    rows = sorted({row for row, _ in cells}, key=lambda row: (-row[0], row[1]))
    header = ["bits", "grid"] + columns
    lines = [f"### {model}: perplexity", "",
             f"Held-out perplexity (mean ± std over seeds when several) and its ratio to FP "
             f"({float(np.mean(fp_values)):.2f}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
      lines.append("| " + " | ".join([str(row[0]), row[1]] + [
          _cell(cells[(row, column)], fp_values) if (row, column) in cells else ""
          for column in columns]) + " |")
    lines += ["", f"### {model}: seconds to quantize", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
      lines.append("| " + " | ".join([str(row[0]), row[1]] + [
          f"{float(np.mean(seconds[(row, column)])):.0f}" if (row, column) in seconds
          else "" for column in columns]) + " |")
    sections.append("\n".join(lines))
  return sections
