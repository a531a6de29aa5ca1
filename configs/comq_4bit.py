"""COMQ 4-bit, per-channel asymmetric grid: the official code's recipe (comq.md §1.7).

One greedy coordinate-descent sweep per layer on the Gram of FP-model inputs, no scale
update, scalar 1.0, every Conv/Dense kernel quantized; no retraining.

Digits (embedded data, ~15 s on 2 CPU cores: 30 FP epochs, then COMQ in seconds):
  python -m experiments.digits --config=comq_4bit
  Expect 99.63 ± 0.34% test accuracy (seeds 0-2; FP 99.78 ± 0.22%; rtn_4bit 98.89 ±
  0.80%) and every layer's COMQ error below its round-to-nearest error (printed per layer).

ImageNet (needs prepared imagenet2012 and torchvision ResNet-18 weights):
  python -m experiments.imagenet --config=comq_4bit --config.init_checkpoint=resnet18.pth
  Paper abstract: 4-bit CNNs within 0.3% top-1 of FP (ResNet-18 table not retrieved).
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "comq_4bit"
  config.method = "comq"
  config.comq.bits = 4
  return config
