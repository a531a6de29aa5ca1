"""experiments.report on synthetic results.json files with known numbers."""

import csv
import json
import os
import subprocess
import sys

import pytest

from experiments import report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEDULES = {5: [0.5, 0.75, 0.875, 1.0], 4: [0.3, 0.5, 0.8, 1.0]}
# (bits, strategy) -> final accuracy per seed 0, 1, 2; FP accuracy is 0.95 for every run.
INQ_FINAL = {(5, "magnitude"): [0.90, 0.92, 0.94], (5, "random"): [0.80, 0.80, 0.80],
             (4, "magnitude"): [0.88, 0.90, 0.95], (4, "random"): [0.70, 0.75, 0.80]}
RTN_FINAL = {("asymmetric", 4): [0.5, 0.7], ("pow2", 4): [0.6, 0.6]}


def write_run(directory, config, results):
  os.makedirs(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump(results, f)


def make_workdir(root):
  for (bits, strategy), finals in INQ_FINAL.items():
    for seed, final in enumerate(finals):
      schedule = SCHEDULES[bits]
      # A portion's accuracy decreases linearly from FP to the final one.
      portions = [{"phase": f"inq_{p:g}", "portion": p,
                   "accuracy": 0.95 + (final - 0.95) * (i + 1) / len(schedule)}
                  for i, p in enumerate(schedule)]
      write_run(os.path.join(root, "partition", f"bits={bits},strategy={strategy},seed={seed}"),
                {"name": "partition", "seed": seed, "method": "inq", "stop_after_steps": 0,
                 "inq": {"bits": bits, "schedule": schedule, "strategy": strategy,
                         "momentum": 0.9}},
                {"config_name": "partition", "method": "inq", "bits": bits, "seed": seed,
                 "fp_accuracy": 0.95, "final_accuracy": final,
                 "portion_accuracies": portions})
  for (grid, bits), finals in RTN_FINAL.items():
    for seed, final in enumerate(finals):
      write_run(os.path.join(root, "rtn", f"grid={grid},seed={seed}"),
                # stop_after_steps differs between seeds and seed 1's config has a field
                # seed 0's lacks (added to the configs later): neither splits a group.
                {"name": "rtn", "seed": seed, "method": "rtn", "stop_after_steps": seed,
                 "rtn": dict({"bits": bits, "grid": grid}, **({"new": 1} if seed else {}))},
                {"config_name": "rtn", "method": "rtn", "bits": bits, "seed": seed,
                 "fp_accuracy": 0.95, "final_accuracy": final, "portion_accuracies": []})


def test_report_tables_csv_and_plots(tmp_path):
  make_workdir(str(tmp_path))
  paths = report.write_report(str(tmp_path))
  assert set(paths) == {"report.md", "summary.csv", "results.csv", "accuracy_vs_bits.png",
                        "inq_portions.png"}
  with open(paths["report.md"]) as f:
    markdown = f.read()
  # Header of the INQ table: the varied fields are the schedule and the strategy.
  assert ("| method | bits | inq.schedule | inq.strategy | seeds | FP acc. (%) | "
          "final acc. (%) | Δ vs FP (points) |") in markdown
  # mean ± sample std (ddof=1) over seeds, in percent.
  assert ("| INQ | 5 | 0.5, 0.75, 0.875, 1 | magnitude | 0,1,2 | 95.00 ± 0.00 | "
          "92.00 ± 2.00 | -3.00 ± 2.00 |") in markdown
  assert ("| INQ | 5 | 0.5, 0.75, 0.875, 1 | random | 0,1,2 | 95.00 ± 0.00 | "
          "80.00 ± 0.00 | -15.00 ± 0.00 |") in markdown
  assert ("| INQ | 4 | 0.3, 0.5, 0.8, 1 | magnitude | 0,1,2 | 95.00 ± 0.00 | "
          "91.00 ± 3.61 | -4.00 ± 3.61 |") in markdown
  assert ("| INQ | 4 | 0.3, 0.5, 0.8, 1 | random | 0,1,2 | 95.00 ± 0.00 | "
          "75.00 ± 5.00 | -20.00 ± 5.00 |") in markdown
  assert "| method | bits | rtn.grid | seeds |" in markdown
  assert "| RTN | 4 | asymmetric | 0,1 | 95.00 ± 0.00 | 60.00 ± 14.14 | -35.00 ± 14.14 |" \
      in markdown
  assert "| RTN | 4 | pow2 | 0,1 | 95.00 ± 0.00 | 60.00 ± 0.00 | -35.00 ± 0.00 |" in markdown
  assert markdown.index("### partition") < markdown.index("### rtn")
  assert "![Test accuracy vs bits](accuracy_vs_bits.png)" in markdown

  with open(paths["summary.csv"]) as f:
    summary = list(csv.DictReader(f))
  assert len(summary) == 6
  row = next(r for r in summary if r["bits"] == "4" and r["inq.strategy"] == "magnitude")
  assert (row["num_seeds"], row["seeds"]) == ("3", "0 1 2")
  assert float(row["final_mean"]) == pytest.approx(91.0)
  assert float(row["final_std"]) == pytest.approx(3.6056, abs=1e-4)
  rtn_row = next(r for r in summary if r["rtn.grid"] == "asymmetric")
  assert rtn_row["inq.strategy"] == ""
  assert float(rtn_row["final_std"]) == pytest.approx(14.1421, abs=1e-4)

  with open(paths["results.csv"]) as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 4 * 3 + 2 * 2
  assert sorted(float(r["final_accuracy"]) for r in runs if r["rtn.grid"] == "asymmetric") \
      == [0.5, 0.7]

  for name in ("accuracy_vs_bits.png", "inq_portions.png"):
    with open(paths[name], "rb") as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC)
    assert 5_000 < len(data) < 200_000


def test_grouping_and_line_fields(tmp_path):
  make_workdir(str(tmp_path))
  groups = report.group_runs(report.load_runs(str(tmp_path)))
  inq_groups = [g for g in groups if g.method == "inq"]
  assert [(g.bits, dict(g.setting)["inq.strategy"]) for g in inq_groups] == [
      (5, "magnitude"), (5, "random"), (4, "magnitude"), (4, "random")]
  # The schedule follows the bits, the strategy does not: one line per strategy.
  assert report.line_fields(inq_groups) == ["inq.strategy"]
  assert report.grid_family(inq_groups[0]) == "power-of-two grid"
  rtn_families = {dict(g.setting)["rtn.grid"]: report.grid_family(g)
                  for g in groups if g.method == "rtn"}
  assert rtn_families == {"asymmetric": "uniform grid", "pow2": "power-of-two grid"}


def test_report_without_inq_runs_leaves_out_the_portion_plot(tmp_path):
  write_run(str(tmp_path / "a"), {"name": "rtn", "seed": 0, "rtn": {"bits": 4}},
            {"config_name": "rtn", "method": "rtn", "bits": 4, "seed": 0,
             "fp_accuracy": 0.9, "final_accuracy": 0.8, "portion_accuracies": []})
  paths = report.write_report(str(tmp_path))
  assert "accuracy_vs_bits.png" in paths and "inq_portions.png" not in paths
  assert not os.path.exists(tmp_path / "report" / "inq_portions.png")
  with open(paths["report.md"]) as f:
    assert "| RTN | 4 | 0 | 90.00 | 80.00 | -10.00 |" in f.read()


def test_missing_inputs_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No results.json"):
    report.load_runs(str(tmp_path))
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "results.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    report.load_runs(str(tmp_path))


@pytest.mark.integration
def test_command_line_writes_the_report(tmp_path):
  make_workdir(str(tmp_path))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.report", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "| RTN | 4 | pow2 | 0,1 |" in result.stdout
  assert sorted(os.listdir(tmp_path / "report")) == [
      "accuracy_vs_bits.png", "inq_portions.png", "report.md", "results.csv", "summary.csv"]


def test_post_training_methods_side_by_side(tmp_path):
  # (method, granularity, group size) -> (final accuracy per seed, summed layer error)
  cases = {("comq", "channel", None): ([0.90, 0.92], 3.0),
           ("gptq", "channel", None): ([0.91, 0.93], 2.0),
           ("rtn", "channel", None): ([0.50, 0.70], 9.0),
           ("comq", "group", 64): ([0.95, 0.95], 1.5)}
  for (method, granularity, group_size), (finals, error) in cases.items():
    for seed, final in enumerate(finals):
      write_run(os.path.join(str(tmp_path), f"{method},{granularity},seed={seed}"),
                {"name": "ptq", "seed": seed, "method": method, "stop_after_steps": 0,
                 method: {"bits": 3, "granularity": granularity,
                          "group_size": group_size}},
                {"config_name": "ptq", "method": method, "bits": 3, "seed": seed,
                 "fp_accuracy": 0.95, "final_accuracy": final, "portion_accuracies": [],
                 "layers": [{"error": error / 2}, {"error": error / 2}]})
  (section,) = report.side_by_side_tables(report.load_runs(str(tmp_path)))
  assert "| bits | grid | COMQ | GPTQ | RTN |" in section
  assert "| 3 | channel | 91.00 ± 1.41 (3.0) | 92.00 ± 1.41 (2.0) | 60.00 ± 14.14 (9.0) |" \
      in section
  assert "| 3 | g64 | 95.00 ± 0.00 (1.5) |  |  |" in section
  with open(report.write_report(str(tmp_path))["report.md"]) as f:
    assert section in f.read()


def test_models_side_by_side(tmp_path):
  # (model, method, bits, group size) -> final accuracy per seed; FP 0.99 (CNN), 0.97 (ViT).
  fp = {"SmallCNN": 0.99, "ViTDigits": 0.97}
  cases = {("SmallCNN", "fp", 32, None): [0.99, 0.99],
           ("SmallCNN", "inq", 5, None): [0.98, 0.96],
           ("SmallCNN", "comq", 4, None): [0.97, 0.97],
           ("SmallCNN", "rtn", 4, None): [0.90, 0.80],
           ("ViTDigits", "fp", 32, None): [0.97, 0.97],
           ("ViTDigits", "comq", 4, None): [0.95, 0.93],
           ("ViTDigits", "comq", 4, 32): [0.96, 0.96],
           ("ViTDigits", "rtn", 4, 32): [0.70, 0.70]}
  for (model, method, bits, group_size), finals in cases.items():
    for seed, final in enumerate(finals):
      block = {"bits": bits, "granularity": "group" if group_size else "channel",
               "group_size": group_size, "grid": "asymmetric"}
      write_run(os.path.join(str(tmp_path), f"{model},{method},{bits},{group_size},{seed}"),
                {"name": "models", "seed": seed, "method": method, "stop_after_steps": 0,
                 "model": {"name": model}, "comq": block, "rtn": block,
                 "batch_size": 16 if model == "ViTDigits" else 32},
                {"config_name": "models", "model": model, "method": method, "bits": bits,
                 "seed": seed, "fp_accuracy": fp[model], "final_accuracy": final,
                 "portion_accuracies": [], "layers": [{"error": 1.0}]})
  runs = report.load_runs(str(tmp_path))
  (section,) = report.model_tables(runs)
  assert ("| bits | grid | SmallCNN FP | SmallCNN INQ | SmallCNN COMQ | SmallCNN RTN | "
          "ViTDigits FP | ViTDigits COMQ | ViTDigits RTN |") in section
  assert "| 32 | float | 99.00 ± 0.00 |  |  |  | 97.00 ± 0.00 |  |  |" in section
  assert "| 5 | pow2 |  | 97.00 ± 1.41 |  |  |  |  |  |" in section
  assert "| 4 | channel |  |  | 97.00 ± 0.00 | 85.00 ± 7.07 |  | 94.00 ± 1.41 |  |" \
      in section
  assert "| 4 | g32 |  |  |  |  |  | 96.00 ± 0.00 | 70.00 ± 0.00 |" in section
  # The post-training table keeps the models apart too.
  (side_by_side,) = report.side_by_side_tables(runs)
  assert ("| bits | grid | SmallCNN COMQ | SmallCNN RTN | ViTDigits COMQ | ViTDigits RTN |"
          in side_by_side)
  # Plot labels name the model, not the fields that follow it (its FP recipe).
  groups = report.group_runs(runs)
  fields = [field for field, _ in groups[0].setting]
  assert "batch_size" in fields and "model.name" in fields
  assert set(fields) - set(report.without_model_recipe(groups, fields)) == {"batch_size"}
  # One model only: no models table.
  assert report.model_tables([run for run in runs if run.results["model"] == "SmallCNN"]) \
      == []
  paths = report.write_report(str(tmp_path))
  with open(paths["report.md"]) as f:
    assert section in f.read()
  with open(paths["accuracy_vs_bits.png"], "rb") as f:
    assert f.read().startswith(PNG_MAGIC)


def test_plot_labels_and_fp_reference(tmp_path):
  make_workdir(str(tmp_path))
  groups = report.group_runs(report.load_runs(str(tmp_path)))
  inq = next(g for g in groups if g.method == "inq")
  rtn = next(g for g in groups if g.method == "rtn")
  # A line shows its own method's fields only, never `method` or another method's block.
  fields = ["inq.strategy", "method", "rtn.grid"]
  assert report.plot_label(inq, fields) == "INQ strategy=magnitude"
  assert report.plot_label(rtn, fields).startswith("RTN grid=")

  # The FP reference counts each seed once, however many runs share its FP model.
  for seed, fp, num_runs in ((0, 0.90, 3), (1, 1.00, 1)):
    for bits in range(num_runs):
      write_run(str(tmp_path / "fp" / f"{seed},{bits}"),
                {"name": "fp", "seed": seed, "rtn": {"bits": bits + 2}},
                {"config_name": "fp", "method": "rtn", "bits": bits + 2, "seed": seed,
                 "fp_accuracy": fp, "final_accuracy": 0.5, "portion_accuracies": []})
  fp_groups = report.group_runs(report.load_runs(str(tmp_path / "fp")))
  assert report.fp_reference(fp_groups) == (pytest.approx(95.0), pytest.approx(7.0711, abs=1e-4))
