"""Times the quantized-matmul kernel family against a bf16 jnp.dot.

Weight formats (bf16 activations, weight-only quantization):

* ``int4_channel``: 4-bit asymmetric uniform codes, a scale and zero point per
  output channel;
* ``int4_g128``: the same with a scale and zero point per 128 input rows;
* ``pow2_4bit``: 4-bit power-of-two codes, an exponent per output channel;
* ``int8_channel``: 8-bit symmetric uniform codes, a scale per channel;
* ``bf16``: the dense weight, ``jnp.dot`` with f32 accumulation.

Usage::

    python -m benchmarks.quantized_matmul            # full sweep (accelerator)
    python -m benchmarks.quantized_matmul --quick    # tiny sizes, CPU

Prints median times, speedups over the bf16 dot in the same run, and the
achieved weight bandwidth (bytes of codes, scales and zero points read, per
second) as a share of the device's peak HBM bandwidth; writes JSON with the
device kind to ``benchmarks/results/quantized_matmul_<device>.json``. On CPU
the kernel runs in the Pallas interpreter: those numbers say nothing about
GPU or TPU performance and are labelled so.
"""

import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks.kernel_timing import PEAK_BANDWIDTH
from benchmarks.kernel_timing import bandwidth_share
from benchmarks.kernel_timing import median_seconds
from benchmarks.kernel_timing import write_result
from quant_core.deploy import kernels
from quant_core.deploy import codes as packing
from quant_core.deploy import sizes

FULL_M = (1, 8, 16, 64, 256, 1024, 4096)
FULL_KN = (4096, 8192)
QUICK_M = (1, 8)
QUICK_KN = (256,)
GROUP_SIZE = 128
# name -> (grid, bits, group_size); grid "pow2", "asymmetric" or "symmetric".
FORMATS = {
    "int4_channel": ("asymmetric", 4, None),
    "int4_g128": ("asymmetric", 4, GROUP_SIZE),
    "pow2_4bit": ("pow2", 4, None),
    "int8_channel": ("symmetric", 8, None),
}


def random_packed(grid: str, bits: int, group_size, k: int, n: int):
  """A packed weight with random codes and parameters (the kernel's cost
  does not depend on the values)."""
  keys = jax.random.split(jax.random.key(bits), 3)
  k_tile = packing.default_k_tile(k, group_size=group_size)
  rows = packing.round_up(k, k_tile) // packing.codes_per_byte(bits)
  top = 2**bits - (1 if grid == "symmetric" else 0)
  codes_per_byte = packing.codes_per_byte(bits)
  codes = jax.random.randint(keys[0], (codes_per_byte, rows, n), 0, top,
                             jnp.int32)
  data = (codes[0] | (codes[-1] << 4) if codes_per_byte == 2 else codes[0]
          ).astype(jnp.uint8)
  params = (n,) if group_size is None else (-(-k // group_size), n)
  if grid == "pow2":
    return packing.PackedPow2(
        data=data, n1=jax.random.randint(keys[1], params, -6, -2, jnp.int32),
        shape=(k, n), bits=bits, k_tile=k_tile, group_size=group_size)
  scale = jax.random.uniform(keys[1], params, jnp.float32, 1e-3, 1e-2)
  zero_point = (None if grid == "symmetric" else
                jax.random.randint(keys[2], params, 0, 2**bits, jnp.int32))
  return packing.PackedUniform(data=data, scale=scale, zero_point=zero_point,
                               shape=(k, n), bits=bits, k_tile=k_tile,
                               group_size=group_size)


def weight_bytes(packed) -> int:
  """Bytes the kernel reads for the weight: codes and grid parameters."""
  return packed.data.nbytes + sum(p.nbytes
                                  for p in sizes.grid_parameters(packed))


def run(ms, kns, repeats: int):
  device = jax.devices()[0]
  kind = device.device_kind
  dense_dot = jax.jit(lambda x, w: jnp.dot(
      x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  kernel = jax.jit(kernels.quantized_matmul)
  rows = []
  for kn in kns:
    dense_w = jax.random.normal(jax.random.key(0), (kn, kn), jnp.bfloat16)
    weights = {name: random_packed(*spec, kn, kn)
               for name, spec in FORMATS.items()}
    for m in ms:
      x = jax.random.normal(jax.random.key(1), (m, kn), jnp.bfloat16)
      dense = median_seconds(dense_dot, x, dense_w, repeats=repeats)
      row = {"m": m, "k": kn, "n": kn, "bf16_s": dense,
             "bf16_weight_bw": dense_w.nbytes / dense}
      for name, packed in weights.items():
        seconds = median_seconds(kernel, x, packed, repeats=repeats)
        row[f"{name}_s"] = seconds
        row[f"{name}_speedup"] = dense / seconds
        row[f"{name}_weight_bw"] = weight_bytes(packed) / seconds
      rows.append(row)
  return {"device": str(device), "device_kind": kind,
          "platform": device.platform, "peak_bandwidth": PEAK_BANDWIDTH.get(kind),
          "interpret": device.platform == "cpu",
          "formats": {name: dict(zip(("grid", "bits", "group_size"), spec,
                                     strict=True))
                      for name, spec in FORMATS.items()},
          "rows": rows}


def print_table(result) -> None:
  if result["interpret"]:
    print("CPU / Pallas interpret mode: times are NOT meaningful for GPU or "
          "TPU targets.")
  peak = result["peak_bandwidth"]
  print(f"device: {result['device_kind']}  peak HBM: {peak or 'n/a'} B/s")
  header = f"{'M':>5} {'K=N':>5} {'bf16 ms':>9} {'bw%':>6}"
  for name in FORMATS:
    header += f" | {name + ' ms':>17} {'x':>5} {'bw%':>6}"
  print(header)
  for r in result["rows"]:
    line = (f"{r['m']:5d} {r['k']:5d} {1e3 * r['bf16_s']:9.3f} "
            f"{bandwidth_share(r['bf16_weight_bw'], peak):>6}")
    for name in FORMATS:
      line += (f" | {1e3 * r[f'{name}_s']:17.3f} {r[f'{name}_speedup']:5.2f} "
               f"{bandwidth_share(r[f'{name}_weight_bw'], peak):>6}")
    print(line)


_QUICK = flags.DEFINE_bool(
    "quick", False, "Tiny sizes (M in 1, 8; K = N = 256) for CPU.")
_M = flags.DEFINE_multi_integer("m", None, "M values (repeat the flag); "
                                "default: the full or quick sweep.")
_KN = flags.DEFINE_multi_integer("kn", None, "K = N values (repeat the flag).")
_REPEATS = flags.DEFINE_integer("repeats", None,
                                "Timed calls per point (default 20, quick 3).")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results"),
    "Directory for the JSON result.")


def main(argv):
  del argv
  ms = _M.value or (QUICK_M if _QUICK.value else FULL_M)
  kns = _KN.value or (QUICK_KN if _QUICK.value else FULL_KN)
  repeats = _REPEATS.value or (3 if _QUICK.value else 20)
  result = run(ms, kns, repeats)
  print_table(result)
  path = write_result(result, "quantized_matmul", _OUT.value, _QUICK.value)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
