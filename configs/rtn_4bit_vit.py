"""Round-to-nearest 4-bit on ViTDigits: rtn_4bit (per-channel asymmetric grid, no
calibration, no retraining) on the transformer of fp_vit; the baseline of comq_4bit_vit
(the same 26 kernels, the same grid; digits only).

  python -m experiments.digits --config=rtn_4bit_vit
  Expect 98.15 ± 0.34% test accuracy (seeds 0-2, ablation_vit; fp_vit 98.00 ± 0.38%;
  comq_4bit_vit 97.93 ± 0.34%: at 4 bits the ViT loses nothing to rounding, and COMQ's
  halved layer error does not show in the accuracy).
"""

from configs import fp_vit
from configs import rtn_4bit

DATASETS = fp_vit.DATASETS


def get_config(dataset="digits"):
  config = fp_vit.use_vit(rtn_4bit.get_config(dataset))
  config.name = "rtn_4bit_vit"
  return config
