"""Whole-model COMQ time on 2 CPU cores: a MobileNetV2-style network and ResNet-18.

Runs ``comq_jax.quantize_model`` (4-bit, greedy, one sweep, per-channel, inputs from
the full-precision model) on random-init models with random-normal calibration
images, and prints for each model: wall time split into capture (forward passes that
accumulate the Grams), waiting for compilation and solves, plus the compilation time
summed over the background threads that compile while the rest runs; the number of
XLA compilations; the
layers quantized; and the peak resident memory of the process that quantized it
(each model runs in its own process, so the peaks do not mix).

Targets (64 images at 224 px, 2 CPU cores): MobileNetV2-style <= 60 s, ResNet-18
<= 15 s.

Run: ``python -m benchmarks.comq_model [--model=mobilenet|resnet18|all --images=64
--batch=16 --size=224]``.
"""

import subprocess
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import model_timing
import comq_jax
from experiments import models

_MODEL = flags.DEFINE_enum("model", "all", ["all", "mobilenet", "resnet18"],
                           "Which model; 'all' runs each in its own process.")
_IMAGES = flags.DEFINE_integer("images", 64, "Calibration images.")
_BATCH = flags.DEFINE_integer("batch", 16, "Calibration batch size.")
_SIZE = flags.DEFINE_integer("size", 224, "Image side in pixels.")
_BITS = flags.DEFINE_integer("bits", 4, "Bit width.")

TARGET_SECONDS = {"mobilenet": 60.0, "resnet18": 15.0}

# MobileNetV2 (Sandler et al., 2018), width 1.0: (expansion, channels, repeats, stride).
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class _ConvBN(nn.Module):
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  act: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                padding="SAME", feature_group_count=self.groups, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return jnp.minimum(nn.relu(x), 6.0) if self.act else x


class MobileNetV2Style(nn.Module):
  """Inverted residual blocks: 1x1 expand, 3x3 depthwise, 1x1 project (52 layers)."""
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = _ConvBN(32, 3, 2)(x)
    channels = 32
    for expansion, out, repeats, stride in _MOBILENET_V2:
      for i in range(repeats):
        y = x
        hidden = channels * expansion
        if expansion != 1:
          y = _ConvBN(hidden)(y)
        y = _ConvBN(hidden, 3, stride if i == 0 else 1, groups=hidden)(y)
        y = _ConvBN(out, act=False)(y)
        residual = stride == 1 or i > 0
        x = x + y if residual and channels == out else y
        channels = out
    x = _ConvBN(1280)(x)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def _run(name):
  model = (MobileNetV2Style() if name == "mobilenet"
           else models.ResNet18(num_classes=1000))
  shape = (_BATCH.value, _SIZE.value, _SIZE.value, 3)
  keys = jax.random.split(jax.random.key(0), _IMAGES.value // _BATCH.value)
  batches = [jax.random.normal(k, shape, jnp.float32) for k in keys]
  kwargs = {} if name == "mobilenet" else {"train": False}
  variables = model.init(jax.random.key(1), batches[0][:1], **kwargs)
  with model_timing.timed() as clock:
    result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=_BITS.value),
                                     **kwargs)
    jax.block_until_ready(result.variables)
  target = TARGET_SECONDS[name]
  print(f"{name}: {len(result.layers)} layers quantized, {len(result.skipped)} left in "
        f"float; {len(batches) * _BATCH.value} images at {_SIZE.value} px, "
        f"{_BITS.value}-bit")
  model_timing.print_timings(result, clock)
  print(f"  target <= {target:.0f} s: {'met' if clock['wall'] <= target else 'MISSED'}")


def main(argv):
  del argv
  if _MODEL.value != "all":
    _run(_MODEL.value)
    return
  for name in ("mobilenet", "resnet18"):
    flags_out = [f"--model={name}", f"--images={_IMAGES.value}", f"--batch={_BATCH.value}",
                 f"--size={_SIZE.value}", f"--bits={_BITS.value}"]
    subprocess.run([sys.executable, "-m", "benchmarks.comq_model", *flags_out], check=True)


if __name__ == "__main__":
  app.run(main)
