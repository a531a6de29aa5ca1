"""Whole-model COMQ on ResNet-18 and ResNet-50: wall time and peak memory against a bound.

Runs ``comq_jax.quantize_model`` (4-bit, greedy, one sweep, per-channel, inputs from
the full-precision model) on random-init models with random-normal calibration images
at 224 px, each case in its own process (so peaks do not mix). The calibration set is a
lazy sequence: each batch is made when read, so only the batches in use exist.

For each case it prints the timings of ``benchmarks.model_timing``, the memory, and
the bound

  model bytes + Grams of the layers in flight + a few (3) batches,

where, with inputs from the full-precision model, every layer is in flight during the
capture (one pass accumulates all the Grams, ``groups * d_in^2`` float32 per layer),
and the Gram of the batch being added to its running sum is in flight beside it (one
more Gram of the largest layer). A batch, as the network holds it, is its largest
activation: the largest output of any module for one capture step (a batch, or a
microbatch with ``--microbatch``).

Memory is measured two ways:

* XLA's buffers: for the capture step and for the largest layer solve, the arguments,
  outputs and temporaries of the compiled program (``Timings.program_bytes``), i.e.
  what a GPU or TPU would hold in its memory;
* the process's peak resident memory (RSS), growth over the RSS just before quantizing.
  A warm-up run over one batch first fills a persistent compilation cache, so that the
  measured run reads its programs from it: the compiler's own memory (LLVM, in
  background threads; it does not grow with the images) is then left out of the
  measured peak. The warm-up's peak RSS, compiler included, is printed too. RSS also
  holds what XLA's buffers leave out: the loaded programs' machine code (ResNet-18's
  capture step alone is about 46 MiB of it), the host's calibration batches, and the
  allocator's slack.

Run: ``python -m benchmarks.comq_resnet [--models=resnet18,resnet50 --images=64,1024
--batch=16 --size=224 --microbatch=N --mesh --nowarm_up]``; ``--mesh`` quantizes on a mesh over
every local device (its axis ``"batch"``), with ``--microbatch``.
"""

import collections.abc
import os
import resource
import subprocess
import sys
import tempfile

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
_WARM_UP = flags.DEFINE_bool("warm_up", True,
                             "First fill a persistent compilation cache with a one-batch run.")

_CONSTRUCTORS = {"resnet18": models.ResNet18, "resnet50": models.ResNet50}

# Batches (largest activations of one capture step) counted in the bound: the
# activation being read, the one being written, and one spare.
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
    result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=_BITS.value),
                                     mesh=mesh, microbatch=_MICROBATCH.value, train=False)
    jax.block_until_ready(result.variables)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  model_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(variables))
  gram_sizes = [4 * groups * d_in * d_in
                for groups, d_in, _ in (r.matrices for r in result.layers)]
  rows = _MICROBATCH.value or _BATCH.value
  activation = _largest_activation(model, variables, (rows,) + shape[1:])
  bound = (model_bytes + sum(gram_sizes) + max(gram_sizes)
           + _BATCHES_IN_BOUND * activation)
  mib = lambda n: f"{n / 2**20:.0f} MiB"
  print(f"{name}: {len(result.layers)} layers quantized, {len(result.skipped)} left in "
        f"float; {images} images at {_SIZE.value} px in batches of {_BATCH.value}, "
        f"microbatch {_MICROBATCH.value}, {_BITS.value}-bit, "
        f"{'mesh of ' + str(mesh.devices.size) if mesh else 'one device'}")
  model_timing.print_timings(result, clock)
  print(f"  bound {mib(bound)} = model {mib(model_bytes)} + Grams of all "
        f"{len(result.layers)} layers {mib(sum(gram_sizes))} + the Gram being added "
        f"{mib(max(gram_sizes))} + {_BATCHES_IN_BOUND} x the largest activation of "
        f"{rows} images {mib(activation)}")
  programs = result.timings.program_bytes
  if programs:
    print(f"  XLA buffers: capture step {mib(programs['capture'])} "
          f"({programs['capture'] / bound:.2f} x bound); largest solve "
          f"{mib(programs['solve'])}")
  print(f"  peak RSS {mib(peak)}; RSS before quantizing {mib(before)}; growth "
        f"{mib(peak - before)} ({(peak - before) / bound:.2f} x bound)")


def _largest_activation(model, variables, shape):
  """Bytes of the largest output of any module of ``model`` on inputs of ``shape``."""
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"]),
      variables, jax.ShapeDtypeStruct(shape, np.float32))
  return max(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def main(argv):
  del argv
  if _CASE.value:
    name, images = _CASE.value.split(":")
    _run(name, int(images))
    return
  for name in _MODELS.value:
    if name not in _CONSTRUCTORS:
      raise ValueError(f"--models takes {sorted(_CONSTRUCTORS)}, got {name!r}.")
    flags_out = [f"--batch={_BATCH.value}", f"--size={_SIZE.value}",
                 f"--bits={_BITS.value}", f"--mesh={_MESH.value}"]
    if _MICROBATCH.value is not None:
      flags_out.append(f"--microbatch={_MICROBATCH.value}")
    with tempfile.TemporaryDirectory() as cache:
      env = dict(os.environ)
      if _WARM_UP.value:
        env.update(JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        print(f"warm-up ({name}, one batch; fills the compilation cache):", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.comq_resnet",
                        f"--case={name}:{_BATCH.value}", *flags_out], check=True, env=env)
      for images in _IMAGES.value:
        subprocess.run([sys.executable, "-m", "benchmarks.comq_resnet",
                        f"--case={name}:{images}", *flags_out], check=True, env=env)


if __name__ == "__main__":
  app.run(main)
