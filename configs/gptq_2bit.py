"""GPTQ 2-bit on comq_2bit's grid: per-channel asymmetric, shrunk by --scalar 0.65.

The same grid as comq_2bit (the official COMQ 2-bit recipe), so that the two differ only
in the layer solver; ablation_ptq compares all methods at scalar 1.0 instead.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=gptq_2bit
  Expect a large drop: 84.89 ± 14.45% test accuracy (seeds 0-2: 94.00, 92.44, 68.22;
  FP 99.78 ± 0.22%; comq_2bit 83.85 ± 4.24%). As for COMQ, the shrink hurts on digits:
  at scalar 1.0 (ablation_ptq) GPTQ 2-bit gives 95.63 ± 2.38%.

ImageNet:
  python -m experiments.imagenet --config=gptq_2bit --config.init_checkpoint=resnet18.pth
"""

from configs import gptq_4bit


def get_config(dataset="imagenet"):
  config = gptq_4bit.get_config(dataset)
  config.name = "gptq_2bit"
  config.gptq.bits = 2
  config.gptq.scalar = 0.65
  return config
