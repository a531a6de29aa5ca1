"""The INQ retraining study: its points' configs, its table and plot."""

import json
import os

import pandas as pd
import pytest

from experiments import inq_retraining


def test_each_option_sets_only_its_fields():
  plain = inq_retraining.point_config("SmallCNN", 4, "plain", 1, 2)
  assert (plain.seed, plain.inq.bits, plain.inq.epochs_per_step) == (2, 4, 1)
  assert not plain.inq.compensation.choose and plain.inq.distill_alpha == 0.0
  assert plain.inq.sensitivity_power is None and plain.inq.final_epochs == 0
  every = inq_retraining.point_config("SmallCNN", 3, "all", 4, 0)
  assert every.inq.compensation.choose and every.inq.compensation.correct
  assert (every.inq.distill_alpha, every.inq.distill_temperature) == (1.0, 4.0)
  assert every.inq.sensitivity_power == 1.0
  recipe = inq_retraining.point_config("ViTDigits", 2, "recipe", 0, 1)
  assert recipe.name == "inq_2bit_compensated" and recipe.model.name == "ViTDigits"
  assert recipe.inq.final_epochs == 0  # no retraining at all with 0 epochs per step
  with pytest.raises(ValueError, match="Unknown model"):
    inq_retraining.point_config("ResNet18", 4, "plain", 1, 0)


def test_unknown_option_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="Unknown options"):
    inq_retraining.run_study(str(tmp_path), ["SmallCNN"], [0], [4], ["compensate"], [1], "")


def test_report_and_plot_of_a_table(tmp_path):
  rows = []
  for seed, option, epochs in [(s, o, e) for s in (0, 1) for o in ("plain", "all")
                               for e in (0, 1)]:
    rows.append(dict(model="SmallCNN", bits=2, option=option, epochs=epochs, seed=seed,
                     fp_accuracy=0.99, accuracy=0.5 + 0.1 * epochs + 0.2 * (option == "all"),
                     codebook_fraction=1.0, before_final_step=0.9,
                     zero_fractions=json.dumps({"conv1/kernel": 0.5, "fc/kernel": 0.25})))
  table = pd.DataFrame(rows)
  text = inq_retraining.markdown_report(table, 60.0, "python -m experiments.inq_retraining")
  lines = {line.split("|")[2].strip(): line for line in text.splitlines()
           if line.startswith("|") and line.split("|")[2].strip() in ("plain", "all")
           and "±" in line}
  assert "50.00 ± 0.00" in lines["plain"] and "60.00 ± 0.00" in lines["plain"]
  assert "70.00 ± 0.00" in lines["all"] and "80.00 ± 0.00" in lines["all"]
  assert "codebook fraction is 1.0" in text and "FP: 99.00 ± 0.00" in text
  assert "conv1/kernel" in text and "after the final step" in text
  path = os.path.join(tmp_path, "plot.png")
  inq_retraining.plot(table, path)
  assert os.path.getsize(path) > 0
