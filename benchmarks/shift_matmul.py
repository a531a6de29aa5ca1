"""Times the shift-matmul kernel (4- and 8-bit codes) against a bf16 jnp.dot.

Usage::

    python -m benchmarks.shift_matmul            # full sweep (accelerator)
    python -m benchmarks.shift_matmul --quick    # tiny sizes, seconds on CPU

Prints median times, speedups over the bf16 dot, and the weight bandwidth
(packed weight bytes / time) as a share of the device's peak HBM bandwidth;
writes JSON to ``benchmarks/results/shift_matmul_<device>.json``. On CPU the
kernel runs in the Pallas interpreter: those numbers say nothing about GPU or
TPU performance and are labelled so.
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
from inq_jax.deploy import kernels
from inq_jax.deploy import packing

FULL_M = (1, 8, 16, 64, 256, 1024, 4096)
FULL_KN = (4096, 8192)
QUICK_M = (1, 8)
QUICK_KN = (128,)


def _random_packed(bits: int, k: int, n: int) -> packing.PackedPow2:
  """Uniform random codes: the kernel's cost does not depend on values."""
  rows = packing.round_up(k, packing.default_k_tile(k)) // \
      packing.codes_per_byte(bits)
  data = jax.random.randint(jax.random.key(bits), (rows, n), 0, 2**8,
                            jnp.int32).astype(jnp.uint8)
  if bits > 4:
    data = data & jnp.uint8(2**bits - 1)
  return packing.PackedPow2(data=data, n1=jnp.int32(-3), shape=(k, n),
                            bits=bits, k_tile=packing.default_k_tile(k))


def run(ms, kns, repeats: int):
  device = jax.devices()[0]
  kind = device.device_kind
  peak = PEAK_BANDWIDTH.get(kind)
  rows = []
  for kn in kns:
    dense_w = jax.random.normal(jax.random.key(0), (kn, kn), jnp.bfloat16)
    packs = {bits: _random_packed(bits, kn, kn) for bits in (4, 8)}
    for m in ms:
      x = jax.random.normal(jax.random.key(1), (m, kn), jnp.bfloat16)
      dense = median_seconds(
          jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32
                                       ).astype(jnp.bfloat16)),
          x, dense_w, repeats=repeats)
      row = {"m": m, "k": kn, "n": kn, "dense_bf16_s": dense,
             "dense_weight_bw": dense_w.nbytes / dense}
      for bits, packed in packs.items():
        seconds = median_seconds(jax.jit(kernels.shift_matmul), x, packed,
                                  repeats=repeats)
        row[f"kernel_{bits}bit_s"] = seconds
        row[f"kernel_{bits}bit_speedup"] = dense / seconds
        row[f"kernel_{bits}bit_weight_bw"] = packed.data.nbytes / seconds
      rows.append(row)
  return {"device": str(device), "device_kind": kind,
          "platform": device.platform, "peak_bandwidth": peak,
          "interpret": device.platform == "cpu", "rows": rows}


def print_table(result) -> None:
  if result["interpret"]:
    print("CPU / Pallas interpret mode: times are NOT meaningful for GPU or "
          "TPU targets.")
  print(f"device: {result['device_kind']}  peak HBM: "
        f"{result['peak_bandwidth'] or 'n/a'} B/s")
  print(f"{'M':>5} {'K=N':>5} {'bf16 dot ms':>11} {'4-bit ms':>9} "
        f"{'x':>5} {'bw%':>6} {'8-bit ms':>9} {'x':>5} {'bw%':>6} "
        f"{'dot bw%':>7}")
  peak = result["peak_bandwidth"]
  for r in result["rows"]:
    print(f"{r['m']:5d} {r['k']:5d} {1e3 * r['dense_bf16_s']:11.3f} "
          f"{1e3 * r['kernel_4bit_s']:9.3f} {r['kernel_4bit_speedup']:5.2f} "
          f"{bandwidth_share(r['kernel_4bit_weight_bw'], peak):>6} "
          f"{1e3 * r['kernel_8bit_s']:9.3f} {r['kernel_8bit_speedup']:5.2f} "
          f"{bandwidth_share(r['kernel_8bit_weight_bw'], peak):>6} "
          f"{bandwidth_share(r['dense_weight_bw'], peak):>7}")


_QUICK = flags.DEFINE_bool(
    "quick", False, "Tiny sizes (M in 1, 8; K = N = 128) for CPU.")
_M = flags.DEFINE_multi_integer("m", None, "M values (repeat the flag); "
                                "default: the full or quick sweep.")
_KN = flags.DEFINE_multi_integer("kn", None, "K = N values (repeat the flag).")
_REPEATS = flags.DEFINE_integer("repeats", None,
                                "Timed calls per point (default 20, quick 3).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"),
                           "Directory for the JSON result.")


def main(argv):
  del argv
  ms = _M.value or (QUICK_M if _QUICK.value else FULL_M)
  kns = _KN.value or (QUICK_KN if _QUICK.value else FULL_KN)
  repeats = _REPEATS.value or (3 if _QUICK.value else 20)
  result = run(ms, kns, repeats)
  print_table(result)
  path = write_result(result, "shift_matmul", _OUT.value, _QUICK.value)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
