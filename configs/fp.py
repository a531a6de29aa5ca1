"""Full-precision baseline: no quantization (method "fp").

Digits (embedded data, ~20 s on 2 CPU cores):
  python -m experiments.digits --config=fp
  Expect ~0.97-0.98 test accuracy; results.json has bits 32 and packed_bytes == fp32_bytes.

ImageNet (evaluates imported torchvision weights):
  python -m experiments.imagenet --config=fp --config.init_checkpoint=resnet18.pth
  Expect ~69.76% top-1 for torchvision's ResNet-18 (IMAGENET1K_V1).
"""

from configs import base


def get_config(dataset="imagenet"):
  return base.get_config(dataset)
