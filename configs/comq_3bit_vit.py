"""COMQ 3-bit on ViTDigits, per-channel asymmetric grid (see comq_4bit_vit; digits only).

  python -m experiments.digits --config=comq_3bit_vit
  Expect EXPECT_COMQ3 (seeds 0-2; fp_vit 98.00 ± 0.38%; round-to-nearest at 3 bits
  EXPECT_RTN3). With --config.comq.granularity=group --config.comq.group_size=32
  (two grids per channel of the 64-input layers, four for fc2): EXPECT_COMQ3G.
"""

from configs import comq_4bit_vit

DATASETS = comq_4bit_vit.DATASETS


def get_config(dataset="digits"):
  config = comq_4bit_vit.get_config(dataset)
  config.name = "comq_3bit_vit"
  config.comq.bits = 3
  return config
