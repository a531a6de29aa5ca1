"""Ablation: INQ 5-bit schedule length (inq.md §4: the paper has no ablation on steps).

Accumulated portions: the paper's 4 steps (0.5, 0.75, 0.875, 1) vs 2 steps (0.5, 1) vs
one shot (1,) (all weights quantized at once, no retraining), x seeds {0, 1, 2}: 9 runs.
Every retraining step keeps the config's epochs_per_step, so shorter schedules also
retrain for fewer epochs in total.

Digits, full sweep (~7 s per run on 2 CPU cores, ~1 min):
  python -m experiments.sweep --config=ablation_inq_schedule \
      --workdir=workdirs/sweeps/ablation_inq_schedule
Reduced (seed 0 only, 3 runs, ~20 s): add --reduced.
"""

from configs import inq_5bit

SCHEDULES = ((0.5, 0.75, 0.875, 1.0), (0.5, 1.0), (1.0,))
SEEDS = (0, 1, 2)


def get_config(dataset="imagenet"):
  config = inq_5bit.get_config(dataset)
  config.name = "ablation_inq_schedule"
  return config


def sweep(add, reduced=False):
  for seed in SEEDS[:1] if reduced else SEEDS:
    for schedule in SCHEDULES:
      add(**{"inq.schedule": schedule, "seed": seed})
