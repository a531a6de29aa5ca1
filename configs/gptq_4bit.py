"""GPTQ 4-bit on COMQ's per-channel asymmetric grid, with the paper code's settings.

Blocks of 128 inputs, 1% dampening, no act-order, calibration and Grams as comq_4bit
(the same images, the same grid), so that comq_4bit against gptq_4bit changes only
the layer solver. Group-wise: --config.gptq.granularity=group --config.gptq.group_size=64.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=gptq_4bit
  Expect 99.70 ± 0.34% test accuracy (seeds 0-2; FP 99.78 ± 0.22%; comq_4bit 99.63 ±
  0.34%, rtn_4bit 98.89 ± 0.80%; ablation_ptq), and every layer's error below
  round-to-nearest's (printed per layer).

ImageNet:
  python -m experiments.imagenet --config=gptq_4bit --config.init_checkpoint=resnet18.pth
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "gptq_4bit"
  config.method = "gptq"
  config.gptq.bits = 4
  return config
