"""Ablation: post-training methods side by side on the same FP model, Grams and grid.

method {COMQ, COMQ started from GPTQ, GPTQ, RTN} x bits {4, 3, 2} x granularity {per
channel, groups of 64 inputs} x seeds {0, 1, 2}: 72 runs. Every method uses the
asymmetric min-max grid with scalar 1.0, the same 256 calibration images, and its
defaults (COMQ: one greedy sweep; GPTQ: blocks of 128, 1% dampening, no act-order,
dynamic group grids). A run trains its own FP model first (identical across methods at
one seed), so the runs of one seed differ only in the layer solver. On the digits CNN a
group of 64 inputs splits conv2 (144 inputs) and conv3 (288) and leaves conv1 (9) and fc
(64) with one group.

Digits, full sweep (~15 min on 2 CPU cores):
  python -m experiments.sweep --config=ablation_ptq --workdir=workdirs/sweeps/ablation_ptq
Reduced (--reduced; seed 0 only: 24 runs, ~5 min).
"""

from configs import comq_4bit

# (method, extra overrides): COMQ from GPTQ's solution is COMQ with init "gptq".
METHODS = (("comq", {}), ("comq", {"comq.init": "gptq"}), ("gptq", {}), ("rtn", {}))
BITS = (4, 3, 2)
GROUP_SIZES = (None, 64)
SEEDS = (0, 1, 2)


def get_config(dataset="imagenet"):
  config = comq_4bit.get_config(dataset)
  config.name = "ablation_ptq"
  return config


def sweep(add, reduced=False):
  for seed in SEEDS[:1] if reduced else SEEDS:
    for method, extra in METHODS:
      for bits in BITS:
        for group_size in GROUP_SIZES:
          point = {"method": method, **extra, f"{method}.bits": bits, "seed": seed}
          if group_size:
            point.update({f"{method}.granularity": "group",
                          f"{method}.group_size": group_size})
          add(**point)
