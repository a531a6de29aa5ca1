"""INQ 5-bit: ResNet-18 schedule {0.5, 0.75, 0.875, 1} (INQ paper, Table 1 / inq.md §2.2).

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=inq_5bit
  Expect 99.70 ± 0.26% test accuracy (seeds 0-2; FP 99.78 ± 0.22%), every kernel in the
  power-of-two codebook (codebook_fraction 1.0), and a packed model of 35,768 bytes
  against 97,128 in FP32 (5-bit codes take a byte each).

ImageNet (needs prepared imagenet2012 and torchvision ResNet-18 weights):
  python -m experiments.imagenet --config=inq_5bit --config.init_checkpoint=resnet18.pth
  Paper: 68.98% top-1 (ref 68.27%); Mxbonn reproduction: 69.64% (ref 69.76%).
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "inq_5bit"
  config.method = "inq"
  config.inq.bits = 5
  config.inq.schedule = (0.5, 0.75, 0.875, 1.0)
  return config
