"""INQ 3-bit: ResNet-18 schedule {0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1} (INQ paper, Table 3).

Digits (embedded data, ~20 s on 2 CPU cores):
  python -m experiments.digits --config=inq_3bit
  Expect 98.15 ± 0.46% test accuracy (seeds 0-2; FP 99.78 ± 0.22%), codebook_fraction 1.0.

ImageNet:
  python -m experiments.imagenet --config=inq_3bit --config.init_checkpoint=resnet18.pth
  Paper: 68.08% top-1 (ref 68.27%).
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "inq_3bit"
  config.method = "inq"
  config.inq.bits = 3
  config.inq.schedule = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
  return config
