"""COMQ 3-bit on ViTDigits, per-channel asymmetric grid (see comq_4bit_vit; digits only).

  python -m experiments.digits --config=comq_3bit_vit
  Expect 98.00 ± 0.59% test accuracy (seeds 0-2, ablation_vit; fp_vit 98.00 ± 0.38%;
  round-to-nearest at 3 bits 97.93 ± 0.71%). With --config.comq.granularity=group
  --config.comq.group_size=32 (two grids per channel of the 64-input layers, four for
  fc2): 98.22 ± 0.22%. At 2 bits (--config.comq.bits=2, scalar 1.0) COMQ keeps
  98.00 ± 0.22% where round-to-nearest drops to 96.07 ± 1.36%.
"""

from configs import comq_4bit_vit

DATASETS = comq_4bit_vit.DATASETS


def get_config(dataset="digits"):
  config = comq_4bit_vit.get_config(dataset)
  config.name = "comq_3bit_vit"
  config.comq.bits = 3
  return config
