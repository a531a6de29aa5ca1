"""Round-to-nearest 4-bit on COMQ's per-channel asymmetric grid: the baseline of comq_4bit.

No calibration data and no retraining: each weight goes to the nearest level of its
output channel's min-max grid (comq_jax.rtn). --config.rtn.grid=pow2 gives
INQ's power-of-two set without retraining.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=rtn_4bit
  Expect 98.89 ± 0.80% test accuracy (seeds 0-2; FP 99.78 ± 0.22%; comq_4bit 99.63 ±
  0.34%).

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
