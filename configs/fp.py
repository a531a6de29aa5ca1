"""Full-precision baseline: no quantization (method "fp").

Digits (embedded data, ~10 s on 2 CPU cores):
  python -m experiments.digits --config=fp
  Expect 99.78 ± 0.22% test accuracy (seeds 0-2); results.json has bits 32 and
  packed_bytes == fp32_bytes.

ImageNet (evaluates imported torchvision weights):
  python -m experiments.imagenet --config=fp --config.init_checkpoint=resnet18.pth
  Expect ~69.76% top-1 for torchvision's ResNet-18 (IMAGENET1K_V1).
"""

from configs import base


def get_config(dataset="imagenet"):
  return base.get_config(dataset)
