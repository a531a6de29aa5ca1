"""Whole-model COMQ time of a vision transformer (default DeiT-S) on CPU, with the paper's recipe.

Runs ``comq_jax.quantize_model`` (4-bit, greedy, one sweep, per-channel asymmetric grid, inputs
from the full-precision model) on a random-init model with random-normal calibration images,
leaving the patch embedding and the classifier head(s) in float as the official COMQ code does
(experiments.methods.post_training.first_and_last_layers, what ``skip_first_last`` skips). It
prints: wall time split into capture (forward passes that accumulate the Grams), waiting for
compilation and solves, plus the compilation time summed over the background threads that
compile while the rest runs; the number of XLA compilations; the layers quantized and left in
float; and the peak resident memory of the process.

DeiT-S has 72 quantized layers here: the official code's 48 nn.Linear (qkv, proj, fc1, fc2 per
block) with qkv as separate query, key and value kernels, which per-channel grids quantize
identically (each output channel is solved on its own, from the same inputs).

Run: ``python -m benchmarks.comq_vit [--model=deit_small --images=64 --batch=16 --size=224
--bits=4]``.
"""

import re

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import model_timing
import comq_jax
from experiments import models
from experiments.methods import post_training

_MODEL = flags.DEFINE_string("model", "deit_small",
                             "Model name or alias (experiments.models), e.g. deit_small, "
                             "vit_base, swin_tiny.")
_IMAGES = flags.DEFINE_integer("images", 64, "Calibration images.")
_BATCH = flags.DEFINE_integer("batch", 16, "Calibration batch size.")
_SIZE = flags.DEFINE_integer("size", 224, "Image side in pixels.")
_BITS = flags.DEFINE_integer("bits", 4, "Bit width.")


def main(argv):
  del argv
  num_classes = 1000
  model = models.create_model(_MODEL.value, num_classes, image_size=_SIZE.value)
  shape = (_BATCH.value, _SIZE.value, _SIZE.value, 3)
  keys = jax.random.split(jax.random.key(0), _IMAGES.value // _BATCH.value)
  batches = [jax.random.normal(k, shape, jnp.float32) for k in keys]
  variables = jax.jit(lambda key: model.init(key, batches[0][:1], train=False))(
      jax.random.key(1))
  ends = post_training.first_and_last_layers(model, variables, batches[0], num_classes)
  with model_timing.timed() as clock:
    result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=_BITS.value),
                                     rules=[(re.escape(path), None) for path in sorted(ends)],
                                     train=False)
    jax.block_until_ready(result.variables)
  print(f"{_MODEL.value}: {len(result.layers)} layers quantized, {len(result.skipped)} left in "
        f"float ({', '.join(entry.path for entry in result.skipped)}); "
        f"{len(batches) * _BATCH.value} images at {_SIZE.value} px, {_BITS.value}-bit")
  model_timing.print_timings(result, clock)

if __name__ == "__main__":
  app.run(main)
