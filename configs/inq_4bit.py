"""INQ 4-bit: ResNet-18 schedule {0.3, 0.5, 0.8, 0.9, 0.95, 1} (INQ paper, Table 3 / inq.md §2.2).

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=inq_4bit
  Expect 99.48 ± 0.26% test accuracy (seeds 0-2; FP 99.78 ± 0.22%), codebook_fraction 1.0.

ImageNet:
  python -m experiments.imagenet --config=inq_4bit --config.init_checkpoint=resnet18.pth
  Paper: 68.89% top-1 (ref 68.27%).
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "inq_4bit"
  config.method = "inq"
  config.inq.bits = 4
  config.inq.schedule = (0.3, 0.5, 0.8, 0.9, 0.95, 1.0)
  return config
