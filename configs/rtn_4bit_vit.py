"""Round-to-nearest 4-bit on ViTDigits: rtn_4bit (per-channel asymmetric grid, no
calibration, no retraining) on the transformer of fp_vit; the baseline of comq_4bit_vit
(the same 26 kernels, the same grid; digits only).

  python -m experiments.digits --config=rtn_4bit_vit
  Expect EXPECT_RTN4 (seeds 0-2; fp_vit 98.00 ± 0.38%; comq_4bit_vit EXPECT_COMQ4).
"""

from configs import fp_vit
from configs import rtn_4bit

DATASETS = fp_vit.DATASETS


def get_config(dataset="digits"):
  config = fp_vit.use_vit(rtn_4bit.get_config(dataset))
  config.name = "rtn_4bit_vit"
  return config
