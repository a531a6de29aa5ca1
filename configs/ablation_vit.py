"""Ablation: the small CNN and ViTDigits side by side, every method at several bit widths.

model {SmallCNN, ViTDigits} x (FP; INQ 5-bit; COMQ and round-to-nearest at bits {4, 3, 2}
x granularity {per channel, groups of 32 inputs}) x seeds {0, 1, 2}: 84 runs. Each model
trains with its own FP recipe (SmallCNN: the base digits one; ViTDigits: fp_vit.VIT, so
its points carry those fields), and every run of one model and seed starts from the same
FP model. COMQ is the official recipe (one greedy sweep, asymmetric min-max grid, scalar
1.0, as comq_4bit; 2 bits included, where comq_2bit would use scalar 0.65), RTN the same
grid; INQ the paper's 5-bit schedule with the magnitude partition (inq_5bit).

Groups of 32 inputs split every ViT layer but the patch embedding (4 inputs): the
attention query/key/value/out, fc1 and the head have 64 inputs (2 groups), fc2 128 (4);
on the CNN they split conv2 (144 inputs, 5 groups) and conv3 (288, 9), fc has 2 and
conv1 (9 inputs) one.

Digits only. Full sweep (51 min measured on 2 busy CPU cores; a ViT run takes 42-106 s
since each trains its FP model, a CNN run 8-36 s):
  python -m experiments.sweep --config=ablation_vit --workdir=workdirs/sweeps/ablation_vit
  python -m experiments.report --workdir=workdirs/sweeps/ablation_vit
Reduced (--reduced; seed 0 and 4 bits only: FP, INQ 5-bit, COMQ and RTN per channel and
g32 per model, 12 runs, about 8 min). Results: docs/results/vit/ and the README.
"""

from configs import comq_4bit
from configs import fp_vit

DATASETS = fp_vit.DATASETS
# Per model, the fields its points set (SmallCNN: the base digits recipe as it is).
MODELS = {"SmallCNN": {"model.name": "SmallCNN"}, "ViTDigits": fp_vit.VIT}
BITS = (4, 3, 2)
GROUP_SIZES = (None, 32)
SEEDS = (0, 1, 2)


def get_config(dataset="digits"):
  fp_vit.check_dataset(dataset)
  config = comq_4bit.get_config(dataset)
  config.name = "ablation_vit"
  return config


def sweep(add, reduced=False):
  for seed in SEEDS[:1] if reduced else SEEDS:
    for model_fields in MODELS.values():
      model_name = {"model.name": model_fields["model.name"]}
      recipe = {k: v for k, v in model_fields.items() if k != "model.name"}
      add(**model_name, method="fp", seed=seed, **recipe)
      add(**model_name, method="inq", **{"inq.bits": 5}, seed=seed, **recipe)
      for method in ("comq", "rtn"):
        for bits in BITS[:1] if reduced else BITS:
          for group_size in GROUP_SIZES:
            grid = ({f"{method}.granularity": "group", f"{method}.group_size": group_size}
                    if group_size else {})
            add(**model_name, method=method, **{f"{method}.bits": bits}, **grid,
                seed=seed, **recipe)
