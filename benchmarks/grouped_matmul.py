"""Times a depthwise convolution's packed product: vmap of the single-group
kernel against ``grouped_quantized_matmul`` (one kernel over all groups).

The layer: a 32-channel depthwise 3x3 convolution on a 4x112x112 batch, i.e.
``rows = 4·112·112 = 50176`` im2col rows of ``K = 9`` per channel and ``N = 1``
output per channel, its weight 5-bit power-of-two with one ``n1`` for the layer
(INQ), packed per channel and stacked. Both paths run with their default
blocks, warm (after one compiling call), timed with ``jax.block_until_ready``:

* (a) ``jax.vmap(quantized_matmul)`` over the channels (the former path: a
  batched ``pallas_call`` with one program per 256 rows and channel);
* (b) ``grouped_quantized_matmul``.

Usage::

    python -m benchmarks.grouped_matmul                # the full layer
    python -m benchmarks.grouped_matmul --rows 4096    # fewer rows, quicker

On CPU the kernels run in the Pallas interpreter, where (a) takes minutes at
the full size; it is therefore timed ``--vmap-repeats`` times (default once)
after its warm-up call, and (b) ``--repeats`` times. The numbers say nothing
about GPU or TPU performance.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import pow2
from quant_core.deploy import codes as packed_codes
from quant_core.deploy import kernels

CHANNELS = 32
KERNEL_SIZE = (3, 3)
BITS = 5
FULL_ROWS = 4 * 112 * 112


def depthwise_packed(channels: int, bits: int, seed: int = 0):
  """A depthwise 3x3 weight quantized to power-of-two with one ``n1`` for the
  layer, packed per channel (``(9, 1)`` matrices) and stacked."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(0.0, 0.1, KERNEL_SIZE + (1, channels)),
                  jnp.float32)
  n1, _ = pow2.pow2_exponents(jnp.max(jnp.abs(w)), bits)
  q = pow2.pow2_quantize(w, bits, n1=n1)
  per_channel = [packed_codes.pack(q[..., c:c + 1], bits, n1)
                 for c in range(channels)]
  return jax.tree.map(lambda *arrays: jnp.stack(arrays), *per_channel)


def timed(name: str, run, args, repeats: int):
  """Median seconds of ``repeats`` warm calls, after one compiling call."""
  start = time.perf_counter()
  result = jax.block_until_ready(run(*args))
  print(f"{name}: first call (compile + run) {time.perf_counter() - start:.2f} s",
        flush=True)
  seconds = []
  for repeat in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(*args))
    seconds.append(time.perf_counter() - start)
    print(f"{name}: warm call {repeat + 1}/{repeats} {seconds[-1]:.3f} s",
          flush=True)
  return statistics.median(seconds), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", type=int, default=FULL_ROWS,
                      help="im2col rows (batch x height x width)")
  parser.add_argument("--repeats", type=int, default=5,
                      help="warm calls of grouped_quantized_matmul")
  parser.add_argument("--vmap-repeats", type=int, default=1,
                      help="warm calls of the vmap path (minutes each at full "
                      "size on CPU)")
  args = parser.parse_args()

  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
  packed = depthwise_packed(CHANNELS, BITS)
  k = KERNEL_SIZE[0] * KERNEL_SIZE[1]
  x = jnp.asarray(np.random.default_rng(1).normal(size=(args.rows, CHANNELS, k)),
                  jnp.float32)
  print(f"x {x.shape} {x.dtype}; packed {BITS}-bit pow2, data "
        f"{packed.data.shape}, n1 {packed.n1.shape}, k_tile {packed.k_tile}",
        flush=True)

  grouped = jax.jit(kernels.grouped_quantized_matmul)
  vmapped = jax.jit(jax.vmap(kernels.quantized_matmul, in_axes=(1, 0),
                             out_axes=1))
  grouped_s, y_grouped = timed("(b) grouped_quantized_matmul", grouped,
                               (x, packed), args.repeats)
  vmap_s, y_vmap = timed("(a) vmap of quantized_matmul", vmapped, (x, packed),
                         args.vmap_repeats)

  difference = float(jnp.max(jnp.abs(y_grouped - y_vmap)))
  print(f"rows {args.rows}, {CHANNELS} channels, K={k}, N=1 per channel")
  print(f"(a) vmap of quantized_matmul : {vmap_s:10.3f} s (median of "
        f"{args.vmap_repeats})")
  print(f"(b) grouped_quantized_matmul : {grouped_s:10.3f} s (median of "
        f"{args.repeats})")
  print(f"speedup (a) / (b)            : {vmap_s / grouped_s:10.1f}x")
  print(f"max |(a) - (b)|              : {difference:.3g} (f32 sums of other "
        "block shapes may round differently)")


if __name__ == "__main__":
  main()
