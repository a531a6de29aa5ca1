"""Round-to-nearest baselines (no calibration, no retraining) at the ablations' bit widths.

* grid "pow2": INQ's power-of-two set {0, ±2^n2..±2^n1} at bits {5, 4, 3, 2}, the
  baseline of ablation_inq_partition (what INQ's incremental retraining adds);
* grid "asymmetric": COMQ's per-channel min-max grid at bits {4, 3, 2}, the baseline of
  ablation_comq (what COMQ's coordinate descent adds);
x seeds {0, 1, 2}: 21 runs, each an FP training (~7 s on 2 CPU cores on digits).

Digits, full sweep (~2.5 min):
  python -m experiments.sweep --config=ablation_rtn --workdir=workdirs/sweeps/ablation_rtn
Reduced (seed 0 only, 7 runs, ~1 min): add --reduced.
"""

from configs import rtn_4bit

GRID_BITS = (("pow2", (5, 4, 3, 2)), ("asymmetric", (4, 3, 2)))
SEEDS = (0, 1, 2)


def get_config(dataset="imagenet"):
  config = rtn_4bit.get_config(dataset)
  config.name = "ablation_rtn"
  return config


def sweep(add, reduced=False):
  for seed in SEEDS[:1] if reduced else SEEDS:
    for grid, all_bits in GRID_BITS:
      for bits in all_bits:
        add(**{"rtn.grid": grid, "rtn.bits": bits, "seed": seed})
