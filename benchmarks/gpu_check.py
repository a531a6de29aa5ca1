"""The prepared GPU check: run it first, in one call, whenever a GPU is available.

``python benchmarks/gpu_check.py --out DIR`` (from the repository root) runs, in order,
within ``--budget_seconds`` (default 480 s, so that one rerun fits in a 15-minute lease):

1. ``environment``: device, platform, jax and jaxlib versions, the commit;
2. ``copy_bandwidth``: a device-to-device copy, the measured peak (bytes read plus
   written per second), against which every bandwidth below is a share;
3. ``kernel_tests``: ``tests/quant_core/deploy/test_gpu_kernels.py`` (pytest marker ``gpu``): every
   kernel format and activation dtype compiled for the backend against the jnp
   reference;
4. ``quantized_matmul``: the kernel against a bf16 ``jnp.dot`` at K = N in {4096, 8192},
   M in {1, 16, 64, 256, 1024, 4096}, uniform 4-bit g128 and 4-bit power of two: time,
   speedup, and the weight bytes read per second as a share of the copy bandwidth;
   on sm_90 also the Hopper (Mosaic GPU) kernel on the 4-bit g128 weights;
5. ``layer_solves``: a COMQ and a GPTQ layer solve, 4-bit g128, at d_in x d_out =
   4096 x 4096 and 4096 x 11008, from a Gram of 2048 rows (compilation excluded);
6. ``model_comq``: ``comq_jax.quantize_model`` of the digits CNN on 256 random images
   (the language models' whole-model PTQ is ``benchmarks/llm_blockwise.py``, too long
   for this check);
7. ``llm_decode``: greedy decoding of Gemma 3 270M (its GGUF when the weights package is
   installed, else randomly initialized: the speed does not depend on the values), RTN
   4-bit g128, one prompt of 32 tokens then 32 new tokens, the packed model through
   ``quantized_matmul`` against its de-quantized float model (``benchmarks/llm_decode.py``;
   compilation excluded, medians of 3 runs).

It installs nothing: the checkout goes on ``sys.path``, and the preinstalled jax runs
it. Each step is timed and caught: a failing step is recorded with its error and the
next one runs. After every step the JSON is rewritten whole (temporary file, then
rename), so a run stopped at its limit still leaves the steps it finished.

``--dry_run`` goes through every step at tiny sizes on any backend (the kernels in
interpret mode on CPU); CI runs it (``tests/benchmarks/test_gpu_check.py``), so that the script
cannot rot. Its figures say nothing about any accelerator.

Output in ``--out``: ``gpu_check_<device kind>.json`` and ``gpu_check_<device
kind>.log`` (``_dry_run`` before the extension in a dry run). JSON schema (version
:data:`SCHEMA_VERSION`)::

  {"schema_version": 1, "dry_run": bool, "device_kind": str, "platform": str,
   "started": ISO time, "seconds": float,
   "steps": {name: {"status": "ok" | "failed" | "skipped", "seconds": float,
                    "error": str (failed), "reason": str (skipped), ...figures}}}

with the figures of each step:

* ``environment``: ``jax``, ``jaxlib``, ``python``, ``devices``, ``commit``;
* ``copy_bandwidth``: ``bytes``, ``bandwidth`` (B/s, read plus written);
* ``kernel_tests``: ``passed``, ``failed``, ``summary`` (pytest's last line);
* ``quantized_matmul``: ``rows``, one per (M, K=N): ``m``, ``k``, ``n``, ``bf16_s``, and
  per format ``<format>_s``, ``<format>_speedup`` (bf16 time over the kernel's),
  ``<format>_weight_bw`` (B/s), ``<format>_bw_share`` (of ``copy_bandwidth``), the
  Hopper kernel as format ``int4_g128_mosaic``; ``mosaic`` says whether and how it
  ran (compiled on sm_90, interpreted in a dry run on CPU, else not timed);
* ``layer_solves``: ``rows``: ``solver``, ``d_in``, ``d_out``, ``seconds`` (median),
  ``compile_seconds``, ``error`` (the layer objective);
* ``model_comq``: ``models``: ``name``, ``layers``, ``wall_seconds``,
  ``capture_seconds``, ``solve_seconds``, ``compilations``;
* ``llm_decode``: what :func:`benchmarks.llm_decode.run` returns: ``settings``,
  ``weights``, ``interpret``, per model (``float``, ``packed``)
  ``prefill_tokens_per_second``, ``decode_tokens_per_second``, ``prefill_seconds``,
  ``decode_seconds``, ``first_run_seconds``; ``packed_vs_float`` (decode
  rates), ``tokens_equal``, ``quantize_seconds``.

Targets (checked by reading the JSON; docs/benchmarks.md says whether they were met):
4-bit g128 at K = N = 8192 at least 3x bf16 at M <= 16 and 0.9x at M >= 1024, weight
bandwidth at least 70% of the measured peak at M = 1; a COMQ solve at 4096 x 11008 in
at most 1 s on one H100.
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402 (after the checkout is on the path)
import jax.numpy as jnp  # noqa: E402

from benchmarks.kernel_timing import median_seconds  # noqa: E402

SCHEMA_VERSION = 1

FULL = dict(copy_bytes=2 << 30, matmul_kn=(4096, 8192),
            matmul_m=(1, 16, 64, 256, 1024, 4096), matmul_repeats=20,
            solves=((4096, 4096), (4096, 11008)), solve_rows=2048, solve_repeats=3,
            group_size=128, model_images=256,
            decode=dict(model_name="gemma3_270m", batch=1, prompt_length=32, new_tokens=32,
                        repeats=3))
DRY_RUN = dict(copy_bytes=16 << 20, matmul_kn=(256,), matmul_m=(1, 16), matmul_repeats=2,
               solves=((64, 48),), solve_rows=128, solve_repeats=1, group_size=64,
               model_images=16,
               decode=dict(model_name="byte_llama", batch=1, prompt_length=4, new_tokens=3,
                           repeats=1))

# name -> (grid, bits): the formats of the matmul sweep, group-wise along K.
MATMUL_FORMATS = {"int4_g128": ("asymmetric", 4), "pow2_4bit_g128": ("pow2", 4)}
# The format the Hopper (Mosaic GPU) kernel is timed on, as "<format>_mosaic".
MOSAIC_FORMAT = "int4_g128"


def environment(sizes):
  del sizes
  commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout.strip() or None
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "python": platform.python_version(),
          "devices": [str(device) for device in jax.devices()], "commit": commit}


def copy_bandwidth(sizes):
  """A device-to-device copy: bytes read plus written per second."""
  elements = sizes["copy_bytes"] // 4
  source = jnp.ones((elements,), jnp.float32)
  copy = jax.jit(lambda a: a + 0.0)  # reads and writes every byte once
  seconds = median_seconds(copy, source, repeats=10)
  return {"bytes": 2 * source.nbytes, "bandwidth": 2 * source.nbytes / seconds}


def kernel_tests(sizes):
  del sizes
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
             "addopts=", "-m", "gpu",
             os.path.join("tests", "quant_core", "deploy", "test_gpu_kernels.py")]
  run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  lines = [line for line in run.stdout.splitlines() if line.strip()]
  summary = lines[-1] if lines else run.stderr[-500:]
  count = lambda word: int(next(iter(re.findall(rf"(\d+) {word}", summary)), 0))
  result = {"passed": count("passed"), "failed": count("failed"), "summary": summary}
  if run.returncode != 0:
    raise RuntimeError(f"kernel tests failed: {summary}\n{run.stdout[-4000:]}")
  return result


def quantized_matmul(sizes, peak=None):
  from benchmarks import quantized_matmul as sweep  # pylint: disable=g-import-not-at-top
  from quant_core.deploy import kernels  # pylint: disable=g-import-not-at-top
  dense_dot = jax.jit(lambda x, w: jnp.dot(
      x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  kernel = jax.jit(kernels.quantized_matmul)
  mosaic, mosaic_status = _mosaic_kernel()
  rows = []
  for kn in sizes["matmul_kn"]:
    dense_w = jax.random.normal(jax.random.key(0), (kn, kn), jnp.bfloat16)
    weights = {name: sweep.random_packed(grid, bits, sizes["group_size"], kn, kn)
               for name, (grid, bits) in MATMUL_FORMATS.items()}
    for m in sizes["matmul_m"]:
      x = jax.random.normal(jax.random.key(1), (m, kn), jnp.bfloat16)
      dense = median_seconds(dense_dot, x, dense_w, repeats=sizes["matmul_repeats"])
      row = {"m": m, "k": kn, "n": kn, "bf16_s": dense}
      timed = [(name, kernel, packed) for name, packed in weights.items()]
      if mosaic is not None:
        timed.append((f"{MOSAIC_FORMAT}_mosaic", mosaic, weights[MOSAIC_FORMAT]))
      for name, function, packed in timed:
        seconds = median_seconds(function, x, packed, repeats=sizes["matmul_repeats"])
        bandwidth = sweep.weight_bytes(packed) / seconds
        row.update({f"{name}_s": seconds, f"{name}_speedup": dense / seconds,
                    f"{name}_weight_bw": bandwidth,
                    f"{name}_bw_share": bandwidth / peak if peak else None})
      rows.append(row)
  return {"rows": rows, "group_size": sizes["group_size"], "mosaic": mosaic_status}


def _mosaic_kernel():
  """The Hopper kernel to time beside Triton, and why it is or is not timed:
  compiled on sm_90, interpreted on CPU (dry run), absent elsewhere."""
  from quant_core.deploy import hopper  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  capability = str(getattr(device, "compute_capability", ""))
  if device.platform == "cpu":
    return (jax.jit(lambda x, p: hopper.hopper_quantized_matmul(x, p, interpret=True)),
            "interpreted (CPU)")
  if device.platform == "gpu" and capability.startswith("9"):
    return jax.jit(hopper.hopper_quantized_matmul), f"compiled for sm_{capability}"
  return None, f"not timed: needs sm_90, the device is {device.platform} {capability}"


def layer_solves(sizes):
  import comq_jax  # pylint: disable=g-import-not-at-top
  rows = []
  for d_in, d_out in sizes["solves"]:
    keys = jax.random.split(jax.random.key(d_out), 2)
    x = jax.random.normal(keys[0], (sizes["solve_rows"], d_in), jnp.float32)
    gram = jax.jit(lambda x: jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST))(x)
    w = 0.02 * jax.random.normal(keys[1], (d_in, d_out), jnp.float32)
    grid = dict(bits=4, granularity="group", group_size=sizes["group_size"])
    for solver in (comq_jax.comq(**grid), comq_jax.gptq(static_groups=True, **grid)):
      start = time.perf_counter()
      result = jax.block_until_ready(solver.quantize_layer(w, gram=gram))
      first = time.perf_counter() - start
      times = []
      for _ in range(sizes["solve_repeats"]):
        start = time.perf_counter()
        jax.block_until_ready(solver.quantize_layer(w, gram=gram))
        times.append(time.perf_counter() - start)
      seconds = statistics.median(times)
      rows.append({"solver": solver.method, "d_in": d_in, "d_out": d_out,
                   "seconds": seconds, "compile_seconds": max(first - seconds, 0.0),
                   "error": float(result.error)})
  return {"rows": rows}


def model_comq(sizes):
  import comq_jax  # pylint: disable=g-import-not-at-top
  from experiments import models  # pylint: disable=g-import-not-at-top
  model = models.SmallCNN()
  images = jax.random.normal(jax.random.key(0), (sizes["model_images"], 8, 8, 1))
  batches = [images[i:i + 16] for i in range(0, sizes["model_images"], 16)]
  variables = model.init(jax.random.key(1), batches[0], train=False)
  start = time.perf_counter()
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4),
                                   train=False)
  jax.block_until_ready(result.variables)
  wall = time.perf_counter() - start
  timings = result.timings
  return {"models": [{"name": "digits SmallCNN", "layers": len(result.layers),
                      "wall_seconds": wall, "capture_seconds": timings.capture_seconds,
                      "solve_seconds": timings.solve_seconds,
                      "compilations": timings.compilations}]}


def llm_decode(sizes):
  from benchmarks import llm_decode as decode  # pylint: disable=g-import-not-at-top
  return decode.run(**sizes["decode"], bits=4, grid="asymmetric",
                    group_size=sizes["group_size"])


# The steps in order; each takes the sizes and the figures of the steps before it.
STEPS = {
    "environment": lambda sizes, done: environment(sizes),
    "copy_bandwidth": lambda sizes, done: copy_bandwidth(sizes),
    "kernel_tests": lambda sizes, done: kernel_tests(sizes),
    "quantized_matmul": lambda sizes, done: quantized_matmul(
        sizes, done.get("copy_bandwidth", {}).get("bandwidth")),
    "layer_solves": lambda sizes, done: layer_solves(sizes),
    "model_comq": lambda sizes, done: model_comq(sizes),
    "llm_decode": lambda sizes, done: llm_decode(sizes),
}


def _paths(out_dir, device_kind, dry_run):
  name = "gpu_check_" + device_kind.replace(" ", "_").replace("/", "_")
  name += "_dry_run" if dry_run else ""
  return os.path.join(out_dir, name + ".json"), os.path.join(out_dir, name + ".log")


def _write(path, result):
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)


def run_check(out_dir, dry_run, budget_seconds):
  """Runs every step, writing the JSON after each; returns the result dict."""
  os.makedirs(out_dir, exist_ok=True)
  sizes = DRY_RUN if dry_run else FULL
  device = jax.devices()[0]
  json_path, log_path = _paths(out_dir, device.device_kind, dry_run)
  result = {"schema_version": SCHEMA_VERSION, "dry_run": dry_run,
            "device_kind": device.device_kind, "platform": device.platform,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "seconds": 0.0, "steps": {}}
  start = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    def say(message):
      line = f"[{time.perf_counter() - start:7.1f} s] {message}"
      print(line, flush=True)
      log.write(line + "\n")
      log.flush()

    say(f"gpu_check on {device.device_kind} ({device.platform}), dry_run={dry_run}")
    for name, step in STEPS.items():
      if time.perf_counter() - start > budget_seconds:
        result["steps"][name] = {"status": "skipped", "seconds": 0.0,
                                 "reason": f"over the {budget_seconds:.0f} s budget"}
        say(f"{name}: skipped (budget)")
        continue
      step_start = time.perf_counter()
      try:
        entry = {"status": "ok", **step(sizes, result["steps"])}
      except Exception as error:  # noqa: BLE001 (recorded; the next step runs)
        entry = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                 "traceback": traceback.format_exc()[-4000:]}
      entry["seconds"] = time.perf_counter() - step_start
      result["steps"][name] = entry
      result["seconds"] = time.perf_counter() - start
      _write(json_path, result)
      say(f"{name}: {entry['status']} in {entry['seconds']:.1f} s"
          + (f": {entry['error']}" if entry["status"] == "failed" else ""))
    say(f"wrote {json_path}")
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for the JSON and the log")
  parser.add_argument("--dry_run", "--dry-run", action="store_true",
                      help="every step at tiny sizes (CI, CPU interpret mode)")
  parser.add_argument("--budget_seconds", type=float, default=480.0,
                      help="steps not started by then are skipped")
  args = parser.parse_args(argv)
  result = run_check(args.out, args.dry_run, args.budget_seconds)
  failed = [name for name, step in result["steps"].items() if step["status"] == "failed"]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
