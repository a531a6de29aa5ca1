"""Ablation: COMQ bits {4, 3, 2} x order {greedy, cyclic} x iters {1, 3} x scale update
{off, on} x seeds {0, 1, 2}: 72 runs (comq.md §1.5-1.7; the paper's order ablation
numbers were not retrieved). Per-channel asymmetric grid, scalar 1.0, FP-model inputs,
as in comq_4bit; compare with ablation_rtn's asymmetric rows.

Every run trains its own FP model (30 epochs on digits) before COMQ, so a run takes about
as long as fp on digits (~8-15 s on 2 CPU cores); COMQ itself takes seconds.

Digits, full sweep (~9 min):
  python -m experiments.sweep --config=ablation_comq --workdir=workdirs/sweeps/ablation_comq
Reduced (--reduced; seed 0, one factor at a time from the official recipe greedy / 1 iter /
no scale update: that, cyclic, 3 iters, scale update on; x bits: 12 runs, ~3 min).
"""

from configs import comq_4bit

BITS = (4, 3, 2)
ORDERS = ("greedy", "cyclic")
ITERS = (1, 3)
SCALE_UPDATES = (False, True)
SEEDS = (0, 1, 2)


def get_config(dataset="imagenet"):
  config = comq_4bit.get_config(dataset)
  config.name = "ablation_comq"
  return config


def sweep(add, reduced=False):
  for seed in SEEDS[:1] if reduced else SEEDS:
    for bits in BITS:
      for order in ORDERS:
        for iters in ITERS:
          for scale_update in SCALE_UPDATES:
            changed_factors = ((order != ORDERS[0]) + (iters != ITERS[0]) +
                               (scale_update != SCALE_UPDATES[0]))
            if reduced and changed_factors > 1:
              continue
            add(**{"comq.bits": bits, "comq.order": order, "comq.iters": iters,
                   "comq.scale_update": scale_update, "seed": seed})
