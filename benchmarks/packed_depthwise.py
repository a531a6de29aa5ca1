"""Packed inference of a depthwise CNN: the groups of a layer as one kernel call,
against one kernel call per group (``jax.vmap`` of the single-matrix kernel).

The network is ``benchmarks.comq_model.MobileNetV2Style`` (52 layers, 17 of them
depthwise 3x3 convs), random init, every kernel quantized to 5-bit powers of two by
INQ's final step and packed with ``inq_jax.pack_model``. The packed model runs
through a jitted ``quant_core.deploy.packed_apply``, warm (after one compiling call), on
``--batch_images`` random images of ``--side`` pixels:

* grouped: what ``packed_apply`` does, each grouped or depthwise layer one
  ``grouped_quantized_matmul`` call with the groups as a grid axis;
* per group: the former path, ``grouped_quantized_matmul`` replaced by a ``jax.vmap``
  of ``quantized_matmul`` over the groups (a batched ``pallas_call``), for this
  comparison only.

Both outputs are compared. On CPU the kernels run in the Pallas interpreter: the
figures measure interpret mode, not GPU or TPU speed.

Run: ``python -m benchmarks.packed_depthwise [--batch_images=4 --side=64 --repeats=3
--skip_per_group]``.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import comq_model
import inq_jax
from quant_core import deploy
from quant_core.deploy import kernels

_BATCH_IMAGES = flags.DEFINE_integer("batch_images", 4, "Images per call.")
_SIDE = flags.DEFINE_integer("side", 64, "Image side in pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm calls timed per path (median).")
_SKIP_PER_GROUP = flags.DEFINE_boolean(
    "skip_per_group", False, "Time only the grouped path (the per-group one is slow).")


def per_group_matmul(x, packed, **options):
  """The former grouped product: one single-matrix kernel call per group."""
  return jax.vmap(lambda xg, pg: kernels.quantized_matmul(xg, pg, **options),
                  in_axes=(1, 0), out_axes=1)(x, packed)


def packed_network(images, size):
  """``(model, packed variables, images)``: the INQ 5-bit MobileNetV2-style network."""
  model = comq_model.MobileNetV2Style()
  x = jax.random.normal(jax.random.key(0), (images, size, size, 3), jnp.float32)
  variables = model.init(jax.random.key(1), x[:1])
  quantizer = inq_jax.inq(bits=5)
  params, state = quantizer.step(variables["params"], quantizer.init(variables["params"]),
                                 1.0)
  variables = dict(variables, params=params)
  return model, inq_jax.pack_model(model, variables, state, x[:1]), x


def time_apply(model, packed, x, repeats):
  """``(compile-and-first-call seconds, median warm seconds, output)``."""
  # A fresh jit per path (jit_packed_apply caches one per model): each traces its kernel.
  run = jax.jit(lambda variables, images: deploy.packed_apply(model, variables, images))
  start = time.perf_counter()
  y = jax.block_until_ready(run(packed, x))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(packed, x))
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), np.asarray(y)


def main(argv):
  del argv
  model, packed, x = packed_network(_BATCH_IMAGES.value, _SIDE.value)
  layers = jax.tree.leaves(packed, is_leaf=lambda leaf: isinstance(leaf, deploy.PackedLayer))
  grouped_layers = sum(1 for leaf in layers
                       if isinstance(leaf, deploy.PackedLayer) and leaf.groups > 1)
  print(f"MobileNetV2Style, INQ 5-bit, {grouped_layers} depthwise layers, "
        f"{_BATCH_IMAGES.value} images at {_SIDE.value} px, {jax.devices()[0].platform} "
        f"(interpret mode on CPU)")
  first, warm, grouped = time_apply(model, packed, x, _REPEATS.value)
  print(f"  grouped (one kernel call per layer): first call {first:.1f} s, "
        f"warm median {warm:.2f} s over {_REPEATS.value}")
  if _SKIP_PER_GROUP.value:
    return
  original = kernels.grouped_quantized_matmul
  kernels.grouped_quantized_matmul = per_group_matmul
  try:
    first_old, warm_old, per_group = time_apply(model, packed, x, _REPEATS.value)
  finally:
    kernels.grouped_quantized_matmul = original
  print(f"  per group (vmap of the kernel):      first call {first_old:.1f} s, "
        f"warm median {warm_old:.2f} s over {_REPEATS.value}")
  print(f"  per group / grouped: {warm_old / warm:.1f}x warm; largest output difference "
        f"{float(np.max(np.abs(per_group - grouped))):.3g}")


if __name__ == "__main__":
  app.run(main)
