"""Accuracy acceptance on digits with the shipped configs (slow: ~6 min on 2 CPU cores).

Run with `python -m pytest -m slow`. Each case runs the full recipe (30 FP epochs, then
quantization) for seeds 0-2 and compares mean accuracies, as the project's acceptance
criteria state them.
"""

import numpy as np
import pytest

import configs
from experiments import train

# Integration (and slow): full digits runs of train_and_evaluate.
pytestmark = pytest.mark.integration

SEEDS = (0, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name,max_drop", [
    ("inq_5bit", 0.005),   # INQ 5-bit: >= FP - 0.5 points
    ("inq_4bit", 0.01),    # INQ 4-bit: >= FP - 1 point
    ("comq_4bit", 0.005),  # COMQ 4-bit per channel: >= FP - 0.5 points
])
def test_three_seed_mean_stays_close_to_full_precision(name, max_drop, tmp_path):
  runs = []
  for seed in SEEDS:
    config = configs.apply_overrides(configs.get_config(name, "digits"),
                                     {"seed": seed, "num_devices": 1})
    runs.append(train.train_and_evaluate(config, str(tmp_path / f"seed{seed}")))
  fp = np.mean([r["fp_accuracy"] for r in runs])
  final = np.mean([r["final_accuracy"] for r in runs])
  assert final >= fp - max_drop, (name, fp, final)
  if name.startswith("inq"):
    assert all(r["codebook_fraction"] == 1.0 for r in runs)
