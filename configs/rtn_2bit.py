"""Round-to-nearest 2-bit on COMQ's per-channel asymmetric grid: the baseline of comq_2bit.

No calibration data and no retraining: each weight goes to the nearest level of its
output channel's min-max grid (comq_jax.round_to_nearest). --config.rtn.grid=pow2 gives
INQ's power-of-two set without retraining.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=rtn_2bit
  Expect a large drop: 67.85 ± 14.76% test accuracy (seeds 0-2; FP 99.78 ± 0.22%);
  compare comq_2bit.

ImageNet:
  python -m experiments.imagenet --config=rtn_2bit --config.init_checkpoint=resnet18.pth
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "rtn_2bit"
  config.method = "rtn"
  config.rtn.bits = 2
  return config
