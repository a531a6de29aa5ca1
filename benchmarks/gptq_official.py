"""Our GPTQ layer solve against the official PyTorch GPTQ code, on CPU.

Both sides quantize the same weights with the same Gram ``H = X^T X`` (``N``
random rows with correlated columns): 4 bits, asymmetric, groups of 128, blocks
of 128, 1% dampening. Ours is the public call ``comq_jax.gptq(...).quantize_layer(w,
gram=H)``; the official side is ``GPTQ.fasterquant`` of IST-DASLab/gptq (Frantar et
al., ICLR 2023), driven as its own scripts do: a ``GPTQ`` built on an ``nn.Linear``,
its ``H`` set to the same matrix and a ``Quantizer`` configured for 4-bit asymmetric
per-channel grids. The official code is not part of this repository: pass the path
of a checkout (or of a folder holding its ``gptq.py`` and ``quant.py``) with
``--official``; without it that side is skipped and the JSON says so.

Times are medians of ``--repeats`` runs after one warm-up call; our first call
(compilation included) is reported beside them, and ``compile_s`` is the first call
less the median. The official side runs with ``torch.set_num_threads(1)`` and
``(2)``; the ratio (official / ours) quotes the faster of the two. ``--before``
names a copy of the former ``comq_jax/baselines.py``, timed the way the former
``GPTQ.quantize_layer`` ran it (host finiteness checks, solve, host read of the
positive-definite flag).

The grids differ slightly (the official min-max range is widened to include 0;
ours is COMQ's grid), so the errors ``||XW - XQ||_F`` of the two results, both
computed here from ``H`` by one formula, are close but not equal.

Usage::

  nice -n 19 python -m benchmarks.gptq_official --official=/tmp/gptq_official \\
      --before=/tmp/gptq_old/baselines_old.py \\
      --out=benchmarks/results/gptq_official_cpu.json
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import comq_jax
from comq_jax import objective

# (d_in, d_out): Gemma 3 270M's MLP, then LLaMA-7B's attention and MLP shapes.
SHAPES = [(640, 2048), (2048, 640), (4096, 4096), (4096, 11008)]
LARGE = [(11008, 4096)]
BITS, GROUP, BLOCK, DAMP = 4, 128, 128, 0.01


def layer_problem(d_in, d_out, rows, seed=0):
  """Weights ``(d_in, d_out)`` and a Gram of ``rows`` correlated random inputs.

  Inputs mix independent columns of uneven scale with 16 shared factors, and a
  few columns have a non-zero mean, so ``H`` is far from diagonal.
  """
  rng = np.random.default_rng(seed)
  scales = rng.uniform(0.3, 2.0, d_in).astype(np.float32)
  x = rng.standard_normal((rows, d_in), dtype=np.float32) * scales
  factors = rng.standard_normal((rows, 16), dtype=np.float32)
  x += factors @ (0.5 * rng.standard_normal((16, d_in), dtype=np.float32))
  x[:, rng.choice(d_in, 8, replace=False)] += 2.0
  w = (0.02 * rng.standard_normal((d_in, d_out))).astype(np.float32)
  gram = np.asarray(jnp.matmul(jnp.asarray(x).T, jnp.asarray(x),
                               precision=jax.lax.Precision.HIGHEST))
  return w, gram


def error_of(w, q, gram):
  """``||X W - X Q||_F`` from the Gram (d_in x d_out layout), float32."""
  return float(objective.reconstruction_error(jnp.asarray(w), jnp.asarray(q),
                                              jnp.asarray(gram)))


def timed(fn, repeats):
  """``(first call seconds, run seconds, last output)``: one warm-up, then runs."""
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    runs.append(time.perf_counter() - start)
  return first, runs, out


def ours(w, gram):
  solver = comq_jax.gptq(bits=BITS, granularity="group", group_size=GROUP,
                         block_size=BLOCK, damp=DAMP)
  w, gram = jnp.asarray(w), jnp.asarray(gram)
  return lambda: jax.block_until_ready(solver.quantize_layer(w, gram=gram).weights)


def before(path, w, gram):
  """The former ``GPTQ.quantize_layer``: host checks, solve, host flag read."""
  spec = importlib.util.spec_from_file_location("baselines_before", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  w, gram = jnp.asarray(w), jnp.asarray(gram)

  def run():
    for a in (w, gram):
      if not bool(jnp.all(jnp.isfinite(a))):
        raise ValueError("non-finite input")
    qt, codes, g, error, positive_definite = module.gptq_solve(
        w.T, gram, bits=BITS, grid="asymmetric", granularity="group", group_size=GROUP,
        scalar=1.0, block_size=BLOCK, damp=DAMP, act_order=False, static_groups=False)
    if not bool(positive_definite):
      raise ValueError("not positive definite")
    result = objective.layer_result(w, qt, codes, g, error, jnp.zeros((0,)),
                                    group_size=GROUP, bits=BITS, grid="asymmetric")
    return jax.block_until_ready(result.weights)
  return run


def official(path, w, gram, rows):
  """``fasterquant`` of the official code on the same weights and ``H``."""
  import torch
  sys.path.insert(0, path)
  with contextlib.redirect_stdout(io.StringIO()):
    import gptq as official_gptq  # noqa: F401  (prints about its CUDA extension)
    import quant as official_quant
  # CPU run: its fasterquant synchronizes CUDA; make that a no-op.
  torch.cuda.synchronize = lambda *args, **kwargs: None
  w_torch = torch.from_numpy(np.ascontiguousarray(w.T))
  h_torch = torch.from_numpy(np.array(gram))

  def run():
    layer = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
    layer.weight.data = w_torch.clone()
    solver = official_gptq.GPTQ(layer)
    # The same matrix as ours (its add_batch would scale X^T X by 2 / nsamples).
    solver.H = h_torch.clone()
    solver.nsamples = rows
    solver.quantizer = official_quant.Quantizer()
    solver.quantizer.configure(BITS, perchannel=True, sym=False, mse=False)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
      solver.fasterquant(blocksize=BLOCK, percdamp=DAMP, groupsize=GROUP)
    seconds = time.perf_counter() - start
    return seconds, layer.weight.data.numpy().T.copy()

  def timed_official(threads, repeats):
    torch.set_num_threads(threads)
    first, q = run()
    runs = [run()[0] for _ in range(repeats)]
    return first, runs, q
  return timed_official


def machine():
  model = platform.processor()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  import jaxlib
  info = dict(cpu=model, cpu_count=os.cpu_count(), platform=platform.platform(),
              python=platform.python_version(), jax=jax.__version__,
              jaxlib=jaxlib.__version__, numpy=np.__version__,
              jax_devices=[str(d) for d in jax.devices()],
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              load_average_start=os.getloadavg())
  with contextlib.suppress(ImportError):
    import torch
    info.update(torch=torch.__version__, torch_threads_default=torch.get_num_threads())
  return info


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--official", default=None,
                      help="folder with the official gptq.py and quant.py")
  parser.add_argument("--before", default=None,
                      help="a copy of the former comq_jax/baselines.py to time too")
  parser.add_argument("--rows", type=int, default=2048, help="calibration rows N")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--large", action="store_true", help="also 11008 x 4096")
  parser.add_argument("--shapes", default=None,
                      help="d_in x d_out list, e.g. 640x2048,4096x4096 (overrides)")
  parser.add_argument("--official_threads", default="1,2",
                      help="torch thread counts for the official side")
  parser.add_argument("--note", default="", help="free text stored in the JSON")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()

  shapes = SHAPES + (LARGE if args.large else [])
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  have_official = bool(args.official) and os.path.exists(
      os.path.join(args.official, "gptq.py"))
  record = dict(
      settings=dict(bits=BITS, grid="asymmetric", group_size=GROUP, block_size=BLOCK,
                    damp=DAMP, rows=args.rows, repeats=args.repeats,
                    statistic="median of repeats after one warm-up call"),
      machine=machine(), note=args.note,
      official=("IST-DASLab/gptq GPTQ.fasterquant (not in this repository), torch CPU"
                if have_official else "skipped: no --official checkout given or found"),
      layers=[])
  for d_in, d_out in shapes:
    w, gram = layer_problem(d_in, d_out, args.rows)
    entry = dict(d_in=d_in, d_out=d_out)
    first, runs, q = timed(ours(w, gram), args.repeats)
    entry["ours"] = dict(first_call_s=first, runs_s=runs, median_s=statistics.median(runs),
                         compile_s=first - statistics.median(runs),
                         error=error_of(w, q, gram))
    line = f"{d_in:5d}x{d_out:<5d} ours {entry['ours']['median_s']:7.3f} s " \
           f"(first {first:6.2f} s)"
    if args.before:
      first, runs, _ = timed(before(args.before, w, gram), args.repeats)
      entry["before"] = dict(first_call_s=first, runs_s=runs,
                             median_s=statistics.median(runs),
                             compile_s=first - statistics.median(runs))
      entry["speedup_vs_before"] = entry["before"]["median_s"] / entry["ours"]["median_s"]
      line += f"  before {entry['before']['median_s']:7.3f} s " \
              f"({entry['speedup_vs_before']:.2f}x)"
    if have_official:
      run_official = official(args.official, w, gram, args.rows)
      entry["official"] = {}
      for threads in [int(t) for t in args.official_threads.split(",")]:
        first, runs, q = run_official(threads, args.repeats)
        entry["official"][f"threads_{threads}"] = dict(
            first_call_s=first, runs_s=runs, median_s=statistics.median(runs))
      entry["official"]["error"] = error_of(w, q, gram)
      best = min(v["median_s"] for k, v in entry["official"].items()
                 if k.startswith("threads"))
      entry["official_over_ours"] = best / entry["ours"]["median_s"]
      line += "".join(f"  official {k} {v['median_s']:7.3f} s"
                      for k, v in entry["official"].items() if k.startswith("threads"))
      line += f", official/ours {entry['official_over_ours']:.2f}"
    print(line, flush=True)
    record["layers"].append(entry)
    if args.out:  # written after every layer, so that a cut run keeps its part
      record["machine"]["load_average_end"] = os.getloadavg()
      with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
