"""GPTQ 3-bit on COMQ's per-channel asymmetric grid (see gptq_4bit).

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=gptq_3bit
  Expect 99.41 ± 0.46% test accuracy (seeds 0-2; FP 99.78 ± 0.22%; comq_3bit 99.33 ±
  0.44%, rtn_3bit 95.48 ± 4.27%; ablation_ptq).

ImageNet:
  python -m experiments.imagenet --config=gptq_3bit --config.init_checkpoint=resnet18.pth
"""

from configs import gptq_4bit


def get_config(dataset="imagenet"):
  config = gptq_4bit.get_config(dataset)
  config.name = "gptq_3bit"
  config.gptq.bits = 3
  return config
