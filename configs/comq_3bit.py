"""COMQ 3-bit, per-channel asymmetric grid, official recipe (see comq_4bit).

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=comq_3bit
  Expect 99.33 ± 0.44% test accuracy (seeds 0-2; FP 99.78 ± 0.22%; rtn_3bit 95.48 ± 4.27%).

ImageNet:
  python -m experiments.imagenet --config=comq_3bit --config.init_checkpoint=resnet18.pth
  No ResNet-18 number retrieved; ViTs lose 1-3 points at 3 bits (comq.md §3.1).
"""

from configs import comq_4bit


def get_config(dataset="imagenet"):
  config = comq_4bit.get_config(dataset)
  config.name = "comq_3bit"
  config.comq.bits = 3
  return config
