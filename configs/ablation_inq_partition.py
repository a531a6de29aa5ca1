"""Ablation: INQ partition strategy x bit width (INQ paper, Tables 2 and 3 / inq.md §4).

Bits {5, 4, 3, 2} (each with the paper's ResNet-18 schedule, inq_jax.SCHEDULES) x partition
{magnitude ("pruning-inspired"), random} x seeds {0, 1, 2}: 24 runs. The paper's only
partition ablation is ResNet-18 5-bit (random 32.11% vs pruning-inspired 31.02% top-1
error); it shows the bit-width trade-off for the pruning-inspired partition only.

Digits, full sweep (~10 s per run on 2 CPU cores, ~5 min):
  python -m experiments.sweep --config=ablation_inq_partition \
      --workdir=workdirs/sweeps/ablation_inq_partition
Reduced (seed 0 only, 8 runs, ~1.5 min): add --reduced.
Then: python -m experiments.report --workdir=workdirs/sweeps
"""

from configs import base
import inq_jax

BITS = (5, 4, 3, 2)
STRATEGIES = ("magnitude", "random")
SEEDS = (0, 1, 2)


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "ablation_inq_partition"
  config.method = "inq"
  return config


def sweep(add, reduced=False):
  for seed in SEEDS[:1] if reduced else SEEDS:
    for bits in BITS:
      for strategy in STRATEGIES:
        add(**{"inq.bits": bits, "inq.schedule": inq_jax.SCHEDULES[bits],
               "inq.strategy": strategy, "seed": seed})
