"""INQ 2-bit (ternary): ResNet-18 schedule {0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1}.

Schedule from the INQ paper, Table 3 / inq.md §2.2.

Digits (embedded data, ~20 s on 2 CPU cores):
  python -m experiments.digits --config=inq_2bit
  Expect a collapse: 22.44 ± 11.90% test accuracy (seeds 0-2; FP 99.78 ± 0.22%),
  codebook_fraction 1.0. With n1 fixed from each layer's largest weight, most weights
  fall below 2^(n1-1) and become zero (see the README's results).
  configs/inq_2bit_compensated.py adds compensation, distillation and a final epoch:
  98.07 ± 0.13%.

ImageNet:
  python -m experiments.imagenet --config=inq_2bit --config.init_checkpoint=resnet18.pth
  Paper: 66.02% top-1 (ref 68.27%), with far more epochs per step (up to 30).
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "inq_2bit"
  config.method = "inq"
  config.inq.bits = 2
  config.inq.schedule = (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1.0)
  return config
