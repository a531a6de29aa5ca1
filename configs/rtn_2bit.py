"""Round-to-nearest 2-bit on COMQ's per-channel asymmetric grid: the baseline of comq_2bit.

See rtn_4bit for what round-to-nearest does.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=rtn_2bit
  Expect a large drop: 67.85 ± 14.76% test accuracy (seeds 0-2; FP 99.78 ± 0.22%);
  compare comq_2bit.

ImageNet:
  python -m experiments.imagenet --config=rtn_2bit --config.init_checkpoint=resnet18.pth
"""

from configs import rtn_4bit


def get_config(dataset="imagenet"):
  config = rtn_4bit.get_config(dataset)
  config.name = "rtn_2bit"
  config.rtn.bits = 2
  return config
