"""The INQ retraining study: its points' configs, its table and plot."""

import json
import os

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from experiments import inq_retraining
from experiments import report


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


def test_report_and_plot_of_a_table(tmp_path, monkeypatch):
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
  figures = []
  save_figure = report.save_figure

  def capture(figure, target):
    figures.append(figure)
    save_figure(figure, target)

  monkeypatch.setattr(report, "save_figure", capture)
  inq_retraining.plot(table, path)
  # The plotted data: one panel (one model, one bit width), each option's mean accuracy
  # in percent against epochs per step (the rows above: 50 + 10 e, +20 for "all"), and
  # the FP accuracy as a flat line.
  (figure,) = figures
  (ax,) = figure.axes
  assert ax.get_title() == "SmallCNN, 2-bit"
  lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
           for line in ax.get_lines()}
  assert set(lines) == {"plain", "all", "FP"}
  for option, start in (("plain", 50.0), ("all", 70.0)):
    xs, ys = lines[option]
    assert xs == [0, 1]
    np.testing.assert_allclose(ys, [start, start + 10.0], atol=1e-9)
  np.testing.assert_allclose(lines["FP"][1], [99.0, 99.0], atol=1e-9)
  # The file is that figure as a PNG that decodes: about 4 x 3.2 inches at 100 dpi
  # (report.save_figure crops it to its content), not a blank image.
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[2] in (3, 4)
  assert 200 <= image.shape[0] <= 400 and 300 <= image.shape[1] <= 500, image.shape
  assert image.shape[1] > image.shape[0]
  assert np.unique(image.reshape(-1, image.shape[2]), axis=0).shape[0] > 10
