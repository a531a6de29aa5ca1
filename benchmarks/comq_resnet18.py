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

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp

import comq_jax
from experiments import models


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--bits", type=int, default=4)
  args = parser.parse_args()
  model = models.ResNet18(num_classes=1000)
  shape = (args.batch, args.size, args.size, 3)
  keys = jax.random.split(jax.random.key(0), args.images // args.batch)
  batches = [jax.random.normal(k, shape, jnp.float32) for k in keys]
  variables = model.init(jax.random.key(1), batches[0][:1], train=False)

  start = time.perf_counter()
  new_variables, reports = comq_jax.quantize_model(
      model, variables, batches, bits=args.bits, train=False)
  jax.block_until_ready(new_variables)
  total = time.perf_counter() - start
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  print(f"ResNet-18, {len(batches) * args.batch} images at {args.size} px in "
        f"batches of {args.batch}, {args.bits}-bit greedy K=1, "
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
  main()
