"""Round-to-nearest 3-bit on COMQ's per-channel asymmetric grid: the baseline of comq_3bit.

No calibration data and no retraining: each weight goes to the nearest level of its
output channel's min-max grid (comq_jax.round_to_nearest). --config.rtn.grid=pow2 gives
INQ's power-of-two set without retraining.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=rtn_3bit
  Expect 95.48 ± 4.27% test accuracy (seeds 0-2; FP 99.78 ± 0.22%; comq_3bit 99.33 ±
  0.44%).

ImageNet:
  python -m experiments.imagenet --config=rtn_3bit --config.init_checkpoint=resnet18.pth
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "rtn_3bit"
  config.method = "rtn"
  config.rtn.bits = 3
  return config
