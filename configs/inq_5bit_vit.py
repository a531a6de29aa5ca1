"""INQ 5-bit on ViTDigits: inq_5bit (schedule {0.5, 0.75, 0.875, 1}, magnitude partition,
digits retraining: SGD lr 0.01, weight decay 5e-4, 4 epochs per step) after the FP
training of fp_vit (digits only).

INQ is a pytree transform and runs unchanged: its default predicate quantizes every
leaf named `kernel` with ndim >= 2, which on this model is the patch-embedding Conv
kernel (2x2x1x64), the attention query/key/value (64x4x16) and out (4x16x64)
DenseGeneral kernels, the MLP fc1/fc2 and the head: 26 kernels, 131,968 of the 136,138
parameters. LayerNorm scales and biases, the class token, the position embedding and
every bias stay in float (and keep training during the retraining steps). Each
kernel's n1 comes from its largest FP weight, per layer (one exponent for a whole 3-D
attention kernel).

  python -m experiments.digits --config=inq_5bit_vit
  Expect 97.70 ± 0.34% test accuracy (seeds 0-2, ablation_vit; fp_vit 98.00 ± 0.38%) and
  codebook_fraction 1.0; about 90 s on 2 CPU cores (FP training, then 3 x 4 epochs).
"""

from configs import fp_vit
from configs import inq_5bit

DATASETS = fp_vit.DATASETS


def get_config(dataset="digits"):
  config = fp_vit.use_vit(inq_5bit.get_config(dataset))
  config.name = "inq_5bit_vit"
  return config
