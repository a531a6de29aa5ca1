"""COMQ 4-bit on ViTDigits: comq_4bit (official recipe, per-channel asymmetric grid) on
the digits transformer of fp_vit (its FP recipe; digits only).

COMQ quantizes every linear kernel that `comq_jax.quantize_model` finds: the patch
embedding Conv (2x2x1x64), each block's attention query, key and value (DenseGeneral
64x4x16: 64 inputs, 64 output channels), out (4x16x64: 64 inputs), MLP fc1 (64x128) and
fc2 (128x64), and the head (64x10): 26 layers. LayerNorms, the class token, the
position embedding and every bias stay in float. Calibration: 256 training images.

  python -m experiments.digits --config=comq_4bit_vit
  Expect 97.93 ± 0.34% test accuracy (seeds 0-2, ablation_vit; fp_vit 98.00 ± 0.38%;
  rtn_4bit_vit 98.15 ± 0.34%) and every layer's COMQ error below its round-to-nearest
  error (summed over the 26 layers: 55.8 against 108.2); about 60 s on 2 CPU cores.
"""

from configs import comq_4bit
from configs import fp_vit

DATASETS = fp_vit.DATASETS


def get_config(dataset="digits"):
  config = fp_vit.use_vit(comq_4bit.get_config(dataset))
  config.name = "comq_4bit_vit"
  return config
