"""Whole-model COMQ on ResNet-18 and ResNet-50: wall time and peak memory against a bound.

Runs ``comq_jax.quantize_model`` (4-bit, greedy, one sweep, per-channel, inputs from
the full-precision model) on random-init models with random-normal calibration images
at 224 px, each case in its own process (so peaks do not mix). The calibration set is a
lazy sequence: each batch is made when read, so only the batches in use exist.

For each case it prints the timings of ``benchmarks.model_timing``, the peak resident
memory (RSS) of the process, its RSS just before quantizing (Python, JAX, the model),
and the bound

  model bytes + Grams of the layers in flight + a few (3) calibration batches,

where, with inputs from the full-precision model, every layer is in flight during the
capture (one pass accumulates all the Grams): the Grams are ``groups * d_in^2``
float32 per layer. It prints the growth of the peak over the RSS before quantizing
against the bound, and their ratio.

Run: ``python -m benchmarks.comq_resnet [--models=resnet18,resnet50 --images=64,1024
--batch=16 --size=224 --microbatch=N --mesh]``; ``--mesh`` quantizes on a mesh over
every local device (its axis ``"batch"``), with ``--microbatch``.
"""

import collections.abc
import os
import resource
import subprocess
import sys

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import model_timing
import comq_jax
from experiments import models

_MODELS = flags.DEFINE_list("models", ["resnet18", "resnet50"],
                            "Models: resnet18 and/or resnet50.")
_IMAGES = flags.DEFINE_list("images", ["64", "1024"], "Calibration image counts.")
_BATCH = flags.DEFINE_integer("batch", 16, "Calibration batch size.")
_SIZE = flags.DEFINE_integer("size", 224, "Image side in pixels.")
_BITS = flags.DEFINE_integer("bits", 4, "Bit width.")
_MICROBATCH = flags.DEFINE_integer("microbatch", None,
                                   "Examples per microbatch (None: whole batches).")
_MESH = flags.DEFINE_bool("mesh", False, "Quantize on a mesh over all local devices.")
_CASE = flags.DEFINE_string("case", None, "Internal: run one 'model:images' case here.")

_CONSTRUCTORS = {"resnet18": models.ResNet18, "resnet50": models.ResNet50}

# Calibration batches counted in the bound: the one being captured, the next being
# made, and one spare.
_BATCHES_IN_BOUND = 3


class RandomImages(collections.abc.Sequence):
  """``count`` batches of random-normal images, each made when it is read."""

  def __init__(self, count, shape):
    self._count, self._shape = count, shape

  def __len__(self):
    return self._count

  def __getitem__(self, index):
    if not 0 <= index < self._count:
      raise IndexError(index)
    return np.random.default_rng(index).standard_normal(self._shape, dtype=np.float32)


def _resident_bytes():
  """The process's current resident memory."""
  with open("/proc/self/statm") as statm:
    return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(name, images):
  shape = (_BATCH.value, _SIZE.value, _SIZE.value, 3)
  if images % _BATCH.value:
    raise ValueError(f"--images={images} must be a multiple of --batch={_BATCH.value}.")
  batches = RandomImages(images // _BATCH.value, shape)
  model = _CONSTRUCTORS[name](num_classes=1000)
  variables = model.init(jax.random.key(1), batches[0][:1], train=False)
  mesh = (jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",)) if _MESH.value
          else None)
  before = _resident_bytes()
  with model_timing.timed() as clock:
    result = comq_jax.quantize_model(model, variables, batches, bits=_BITS.value,
                                     mesh=mesh, microbatch=_MICROBATCH.value, train=False)
    jax.block_until_ready(result.variables)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  model_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(variables))
  gram_bytes = sum(4 * groups * d_in * d_in
                   for groups, d_in, _ in (r.matrices for r in result.layers))
  batch_bytes = _BATCHES_IN_BOUND * int(np.prod(shape)) * 4
  bound = model_bytes + gram_bytes + batch_bytes
  mib = lambda n: f"{n / 2**20:.0f} MiB"
  print(f"{name}: {len(result.layers)} layers quantized, {len(result.skipped)} left in "
        f"float; {images} images at {_SIZE.value} px in batches of {_BATCH.value}, "
        f"microbatch {_MICROBATCH.value}, {_BITS.value}-bit, "
        f"{'mesh of ' + str(mesh.devices.size) if mesh else 'one device'}")
  model_timing.print_timings(result, clock)
  print(f"  peak RSS {mib(peak)}; RSS before quantizing {mib(before)}; growth "
        f"{mib(peak - before)}")
  print(f"  bound {mib(bound)} = model {mib(model_bytes)} + Grams of all "
        f"{len(result.layers)} layers (in flight together in the capture) "
        f"{mib(gram_bytes)} + {_BATCHES_IN_BOUND} batches {mib(batch_bytes)}")
  print(f"  growth / bound {(peak - before) / bound:.2f}; peak / (RSS before + bound) "
        f"{peak / (before + bound):.2f}")
  # Measured after the peak: what one forward pass over a (micro)batch holds at once.
  rows = _MICROBATCH.value or _BATCH.value
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, batches[0][:rows]).compile().memory_analysis()
  if forward is not None:
    print(f"  for comparison: XLA's temporary buffers of one forward pass over {rows} "
          f"images {mib(forward.temp_size_in_bytes)} (the capture adds the im2col "
          f"patches of the layer being captured)")


def main(argv):
  del argv
  if _CASE.value:
    name, images = _CASE.value.split(":")
    _run(name, int(images))
    return
  for name in _MODELS.value:
    if name not in _CONSTRUCTORS:
      raise ValueError(f"--models takes {sorted(_CONSTRUCTORS)}, got {name!r}.")
    for images in _IMAGES.value:
      flags_out = [f"--case={name}:{images}", f"--batch={_BATCH.value}",
                   f"--size={_SIZE.value}", f"--bits={_BITS.value}",
                   f"--mesh={_MESH.value}"]
      if _MICROBATCH.value is not None:
        flags_out.append(f"--microbatch={_MICROBATCH.value}")
      subprocess.run([sys.executable, "-m", "benchmarks.comq_resnet", *flags_out],
                     check=True)


if __name__ == "__main__":
  app.run(main)
