"""The low-bit study's budgets and report (experiments.ptq_study), on hand-made rows."""

import pandas as pd
import pytest

from experiments import ptq_study


def test_storage_budget_is_the_uniform_size_interpolated_between_widths():
  costs = {"a": {2: 200, 3: 300, 4: 400, 8: 800}, "b": {2: 40, 3: 50, 4: 60, 8: 100}}
  weights = {"a": 100, "b": 20}
  assert ptq_study.storage_budget(costs, weights, 3) == pytest.approx(350 / 120)
  assert ptq_study.storage_budget(costs, weights, 2.5) == pytest.approx(295 / 120)


def rows():
  base = dict(model="SmallCNN", seed=0, fp_accuracy=0.99, relative_error=0.1, seconds=1.0,
              bits_per_weight=3.5)
  table = []
  for method, none, magr in (("RTN", 10.0, 8.0), ("GPTQ", 4.0, 5.0)):
    for flag, objective in ((False, none), (True, magr)):
      table.append(dict(base, part="matrix", method=method, magr=flag, bits=3,
                        granularity="channel", objective=objective, accuracy=0.9))
  table.append(dict(base, part="orders", method="COMQ diag", magr=False, bits=3,
                    granularity="channel", objective=3.0, accuracy=0.95))
  table.append(dict(base, part="mixed", method="COMQ 3 sweeps + scales, mixed 3",
                    magr=False, bits=3.0, granularity="channel", objective=2.0,
                    accuracy=0.96, widths="2/4/8"))
  return pd.DataFrame(table)


def test_report_names_the_cells_where_magr_raises_the_objective():
  text = ptq_study.markdown_report(rows(), ptq_study.Settings(models=("SmallCNN",)), 60.0)
  assert "Cells where MagR raises the objective: GPTQ W3 channel." in text
  assert "COMQ diag" in text and "2/4/8" in text
  rtn_line = next(line for line in text.splitlines() if "| RTN " in line)
  assert rtn_line.split("|")[-2].strip() == "0.8"  # RTN's MagR / none
