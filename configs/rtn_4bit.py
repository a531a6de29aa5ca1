"""Round-to-nearest 4-bit on COMQ's per-channel asymmetric grid: the baseline of comq_4bit.

No calibration data and no retraining: each weight goes to the nearest level of its
output channel's min-max grid (comq_jax.round_to_nearest). --config.rtn.grid=pow2 gives
INQ's power-of-two set without retraining.

Digits (embedded data, ~1 min on 2 CPU cores):
  python -m experiments.digits --config=rtn_4bit
  Expect the final accuracy within ~0.5 points of FP (seed 0: 0.9933 -> 0.9956).
  rtn_4bit vs comq_4bit shows little difference on digits; see the per-layer errors.

ImageNet:
  python -m experiments.imagenet --config=rtn_4bit --config.init_checkpoint=resnet18.pth
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "rtn_4bit"
  config.method = "rtn"
  config.rtn.bits = 4
  return config
