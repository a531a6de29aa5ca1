"""Round-to-nearest 3-bit on COMQ's per-channel asymmetric grid: the baseline of comq_3bit.

See rtn_4bit for what round-to-nearest does.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=rtn_3bit
  Expect 95.48 ± 4.27% test accuracy (seeds 0-2; FP 99.78 ± 0.22%; comq_3bit 99.33 ±
  0.44%).

ImageNet:
  python -m experiments.imagenet --config=rtn_3bit --config.init_checkpoint=resnet18.pth
"""

from configs import rtn_4bit


def get_config(dataset="imagenet"):
  config = rtn_4bit.get_config(dataset)
  config.name = "rtn_3bit"
  config.rtn.bits = 3
  return config
