"""COMQ 2-bit with the official README's grid shrink `--scalar 0.65` (comq.md §1.7).

The README's 2-bit recipe also runs `--batchtuning`, one epoch of backprop on the
norm/embedding parameters; that is not implemented here (COMQ stays backprop-free), so
expect a larger drop than the paper's 2-bit numbers.

Digits (embedded data, ~1 min on 2 CPU cores):
  python -m experiments.digits --config=comq_2bit
  Expect a large drop from FP (seed 0: 0.9933 -> 0.8156; rtn_2bit at scalar 1.0: 0.7933).

ImageNet:
  python -m experiments.imagenet --config=comq_2bit --config.init_checkpoint=resnet18.pth
"""

from configs import base


def get_config(dataset="imagenet"):
  config = base.get_config(dataset)
  config.name = "comq_2bit"
  config.method = "comq"
  config.comq.bits = 2
  config.comq.scalar = 0.65
  return config
