"""COMQ 2-bit with the official README's grid shrink `--scalar 0.65` (comq.md §1.7).

The README's 2-bit recipe also runs `--batchtuning`, one epoch of backprop on the
norm/embedding parameters; that is not implemented here (COMQ stays backprop-free), so
expect a larger drop than the paper's 2-bit numbers.

Digits (embedded data, ~15 s on 2 CPU cores):
  python -m experiments.digits --config=comq_2bit
  Expect a large drop: 83.85 ± 4.24% test accuracy (seeds 0-2; FP 99.78 ± 0.22%). On
  digits the shrink hurts: --config.comq.scalar=1.0 gives 95.48 ± 1.48% and rtn_2bit
  67.85 ± 14.76%.

ImageNet:
  python -m experiments.imagenet --config=comq_2bit --config.init_checkpoint=resnet18.pth
"""

from configs import comq_4bit


def get_config(dataset="imagenet"):
  config = comq_4bit.get_config(dataset)
  config.name = "comq_2bit"
  config.comq.bits = 2
  config.comq.scalar = 0.65
  return config
