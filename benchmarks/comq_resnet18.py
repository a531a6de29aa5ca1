"""Times COMQ (Zhang et al., arXiv 2403.07134) on a whole ResNet-18.

Runs ``comq_jax.quantize_model`` (4-bit, greedy, one sweep, inputs from the
full-precision model) on ``experiments.models.ResNet18`` with random
initialisation and random-normal calibration images, and prints the total
wall time (capture + solves + write-back, compilation included, since a model
is quantized once), a per-layer summary of solve times (as reported by
``quantize_model``, which blocks on each result) and the peak resident memory
of the process.

Run: ``python benchmarks/comq_resnet18.py [--images 64 --batch 16 --size 224]``.
"""

import resource
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import comq_jax
from experiments import models


_IMAGES = flags.DEFINE_integer("images", 64, "Calibration images.")
_BATCH = flags.DEFINE_integer("batch", 16, "Calibration batch size.")
_SIZE = flags.DEFINE_integer("size", 224, "Image side in pixels.")
_BITS = flags.DEFINE_integer("bits", 4, "COMQ bit width.")


def main(argv):
  del argv
  model = models.ResNet18(num_classes=1000)
  shape = (_BATCH.value, _SIZE.value, _SIZE.value, 3)
  keys = jax.random.split(jax.random.key(0), _IMAGES.value // _BATCH.value)
  batches = [jax.random.normal(k, shape, jnp.float32) for k in keys]
  variables = model.init(jax.random.key(1), batches[0][:1], train=False)

  start = time.perf_counter()
  result = comq_jax.quantize_model(
      model, variables, batches, bits=_BITS.value, train=False)
  jax.block_until_ready(result.variables)
  reports = result.layers
  total = time.perf_counter() - start
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  print(f"ResNet-18, {len(batches) * _BATCH.value} images at {_SIZE.value} px in "
        f"batches of {_BATCH.value}, {_BITS.value}-bit greedy K=1, "
        f"{jax.devices()[0].platform}")
  print(f"{'layer':28s} {'kernel':>18s} {'solve s':>8s} {'COMQ err':>10s} "
        f"{'RTN err':>10s}")
  for r in reports:
    print(f"{r.path:28s} {str(r.shape):>18s} {r.seconds:8.2f} "
          f"{r.error:10.4g} {r.rtn_error:10.4g}")
  seconds = [r.seconds for r in reports]
  print(f"layers: {len(reports)}; solve time total {sum(seconds):.1f} s, "
        f"median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s")
  print(f"total wall time (capture + solves, compilation included): "
        f"{total:.1f} s")
  print(f"peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
  app.run(main)
