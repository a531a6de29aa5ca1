"""Layer solves at Llama-2-7B and 70B shapes, Gram throughput and machine peaks.

The figures behind ``docs/scale.md``, the plan for quantizing a 7B to 70B model block
by block. Three parts, all on the local device (a CPU unless JAX finds another):

* **Machine peaks**: memory bandwidth (a jitted copy, in place and into a new buffer,
  and a jitted sum over a 1 GiB float32 array) and float32 matrix throughput (a jitted
  4096^3 product at HIGHEST precision), so that the layer times can be scaled to other
  machines.
* **Gram accumulation**: ``X^T X`` of one chunk of ``--gram_rows`` (4096) float32 rows,
  jitted, HIGHEST precision, at ``d_in`` in {4096, 8192, 11008, 28672}, as GFLOP/s
  (``2 rows d_in^2`` flops).
* **Layer solves** at the real shapes (d_in x d_out): 4096x4096, 4096x11008,
  11008x4096 (Llama-2-7B) and 8192x8192, 8192x28672, 28672x8192 (Llama-2-70B), 4-bit
  asymmetric groups of 128, for ``comq_jax.rtn``, ``comq_jax.gptq`` (blocks of 128, 1%
  dampening) and ``comq_jax.comq(order="diag")`` (one sweep), each through
  ``solver.quantize_layer(w, gram=gram)`` on the problem of
  ``benchmarks.gptq_official.layer_problem`` (``--rows`` correlated random rows). Times
  are medians of ``--repeats`` runs after one warm-up call; ``compile_s`` is the
  warm-up less the median. A solve whose warm-up takes longer than ``--long_s``
  seconds runs once more only (``repeats_run`` = 1 in the JSON), and one whose warm-up
  takes longer than ``--once_s`` not again (``repeats_run`` = 0: its time includes the
  compilation, a few seconds at the smaller shapes). Greedy COMQ is not
  run: its sweep reads ``4 d_out d_in^2`` bytes of Gram rows (one order per channel,
  so no two channels share a read); the JSON gives those bytes per shape and the time
  they take at the measured read bandwidth.

Before a solve runs, XLA compiles its core (``solver.solve`` on abstract arrays) and
the JSON records its memory analysis (arguments, outputs, temporaries): the solve's
peak memory. A solve whose estimate exceeds the memory available is recorded as
skipped; each shape runs in a child process, so a solve killed by the system (out of
memory) is recorded as such and the next shape still runs.

Usage::

  nice -n 19 python -m benchmarks.scale_layers --out benchmarks/results/scale_layers_cpu.json
  nice -n 19 python -m benchmarks.scale_layers --shapes 4096x4096 --solvers rtn,gptq \\
      --repeats 1 --skip_peaks --skip_gram
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import comq_jax
from benchmarks import gptq_official

SHAPES = {  # (d_in, d_out): the model and the layers of that shape
    (4096, 4096): "Llama-2-7B q/k/v/o",
    (4096, 11008): "Llama-2-7B gate/up",
    (11008, 4096): "Llama-2-7B down",
    (8192, 8192): "Llama-2-70B q/o",
    (8192, 28672): "Llama-2-70B gate/up",
    (28672, 8192): "Llama-2-70B down",
}
SOLVERS = {
    "rtn": lambda: comq_jax.rtn(4, granularity="group", group_size=128),
    "gptq": lambda: comq_jax.gptq(4, granularity="group", group_size=128),
    "comq_diag": lambda: comq_jax.comq(4, order="diag", granularity="group",
                                       group_size=128),
}
GRAM_D_IN = (4096, 8192, 11008, 28672)
HIGHEST = jax.lax.Precision.HIGHEST


def _adaptive(fn, repeats, long_s, once_s=float("inf")):
  """As ``gptq_official.timed``, with one run only when the warm-up exceeds ``long_s``
  and none (``runs`` empty) when it exceeds ``once_s``."""
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  runs = []
  for _ in range(0 if first > once_s else 1 if first > long_s else repeats):
    start = time.perf_counter()
    out = fn()
    runs.append(time.perf_counter() - start)
  return first, runs, out


def _available_bytes():
  with open("/proc/meminfo") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["MemAvailable"].split()[0]) * 1024


def peaks(repeats):
  """Copy and sum bandwidth over a 1 GiB float32 array; float32 4096^3 GFLOP/s."""
  a = jnp.ones((2**28,), jnp.float32)  # 1 GiB
  scale = lambda v: v * 1.0001
  fresh, donated = jax.jit(scale), jax.jit(scale, donate_argnums=0)
  _, runs, _ = gptq_official.timed(lambda a=a: jax.block_until_ready(fresh(a)), repeats)
  fresh_s = statistics.median(runs)
  held = [jnp.ones((2**28,), jnp.float32)]  # the donated copy writes over its input

  def in_place():
    held[0] = jax.block_until_ready(donated(held[0]))
  _, runs, _ = gptq_official.timed(in_place, repeats)
  copy_s = statistics.median(runs)
  del held[0]
  total = jax.jit(jnp.sum)
  _, runs, _ = gptq_official.timed(lambda a=a: jax.block_until_ready(total(a)), repeats)
  sum_s = statistics.median(runs)
  n = 4096
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  y = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  out = {}
  for name, precision in (("highest", HIGHEST), ("default", None)):
    mm = jax.jit(lambda p, q, precision=precision: jnp.matmul(p, q, precision=precision))
    _, runs, _ = gptq_official.timed(lambda mm=mm: jax.block_until_ready(mm(x, y)),
                                     repeats)
    out[name] = dict(median_s=statistics.median(runs), runs_s=runs,
                     gflops=2 * n**3 / statistics.median(runs) / 1e9)
  record = dict(
      copy=dict(bytes_moved=2 * 2**30, median_s=copy_s, gb_s=2 * 2**30 / copy_s / 1e9,
                what=("jitted v * 1.0001 over 1 GiB float32, input donated: 1 GiB read + "
                      "1 GiB written into the same buffer")),
      copy_fresh=dict(bytes_moved=2 * 2**30, median_s=fresh_s,
                      gb_s=2 * 2**30 / fresh_s / 1e9,
                      what=("the same into a newly allocated 1 GiB output (its pages "
                            "are faulted in on first write)")),
      sum=dict(bytes_read=2**30, median_s=sum_s, gb_s=2**30 / sum_s / 1e9,
               what="jitted jnp.sum over 1 GiB float32"),
      matmul_4096=dict(out, what="jitted float32 4096x4096 @ 4096x4096, 2 n^3 flops"))
  print(f"copy {record['copy']['gb_s']:.1f} GB/s (read + write; "
        f"{record['copy_fresh']['gb_s']:.1f} GB/s into a new buffer), sum "
        f"{record['sum']['gb_s']:.1f} GB/s, float32 4096^3 matmul "
        f"{out['highest']['gflops']:.1f} GFLOP/s (HIGHEST), "
        f"{out['default']['gflops']:.1f} GFLOP/s (default precision)", flush=True)
  return record


def gram_throughput(rows, repeats, long_s):
  """``X^T X`` of one ``rows x d_in`` float32 chunk, jitted, HIGHEST precision."""
  gram = jax.jit(lambda x: jnp.matmul(x.T, x, precision=HIGHEST))
  record = []
  for d_in in GRAM_D_IN:
    x = jax.random.normal(jax.random.key(d_in), (rows, d_in), jnp.float32)
    first, runs, out = _adaptive(lambda x=x: jax.block_until_ready(gram(x)), repeats, long_s)
    del out, x
    median = statistics.median(runs)
    flops = 2 * rows * d_in**2
    record.append(dict(rows=rows, d_in=d_in, median_s=median, runs_s=runs,
                       first_call_s=first, gflops=flops / median / 1e9))
    print(f"gram {rows}x{d_in}: {median:7.3f} s, {flops / median / 1e9:6.1f} GFLOP/s",
          flush=True)
  return record


def memory_estimate(solver, d_in, d_out):
  """XLA's memory analysis of ``solver.solve`` at the shape (compiled, not run)."""
  core = jax.jit(lambda w, g: solver.solve(w.T, g)[:4])
  start = time.perf_counter()
  compiled = core.lower(jax.ShapeDtypeStruct((d_in, d_out), jnp.float32),
                        jax.ShapeDtypeStruct((d_in, d_in), jnp.float32)).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  if analysis is None:
    return dict(compile_of_core_s=seconds)
  sizes = dict(argument_bytes=analysis.argument_size_in_bytes,
               output_bytes=analysis.output_size_in_bytes,
               temp_bytes=analysis.temp_size_in_bytes,
               alias_bytes=analysis.alias_size_in_bytes)
  sizes["total_bytes"] = (sizes["argument_bytes"] + sizes["output_bytes"]
                          + sizes["temp_bytes"] - sizes["alias_bytes"])
  return dict(sizes, compile_of_core_s=seconds)


def run_shape(d_in, d_out, solvers, rows, repeats, long_s, once_s, out_path):
  """Child process: every solver on one shape, the record rewritten after each."""
  entry = dict(d_in=d_in, d_out=d_out, layers=SHAPES.get((d_in, d_out), ""),
               greedy_comq_gram_bytes_per_sweep=4 * d_out * d_in**2)

  def write():
    with open(out_path, "w") as f:
      json.dump(entry, f)

  start = time.perf_counter()
  w, gram = gptq_official.layer_problem(d_in, d_out, rows)
  w, gram = jnp.asarray(w), jnp.asarray(gram)
  entry["problem_s"] = time.perf_counter() - start
  for name in solvers:
    solver = SOLVERS[name]()
    record = entry[name] = dict(settings=solver.settings())
    try:
      record["memory"] = memory_estimate(solver, d_in, d_out)
      available = _available_bytes()
      record["memory"]["available_bytes_before"] = available
      need = record["memory"].get("total_bytes", 0) - record["memory"].get(
          "argument_bytes", 0)  # the arguments are already in memory
      if need > 0.9 * available:
        record["skipped"] = (f"XLA's estimate {need / 2**30:.1f} GiB beyond the arguments "
                             f"exceeds 90% of the {available / 2**30:.1f} GiB available")
        print(f"{d_in}x{d_out} {name}: skipped, {record['skipped']}", flush=True)
        write()
        continue
      write()
      run = lambda solver=solver: jax.block_until_ready(
          solver.quantize_layer(w, gram=gram))
      first, runs, result = _adaptive(run, repeats, long_s, once_s)
    except Exception as error:  # noqa: BLE001 (recorded: e.g. out of memory in XLA)
      record["failed"] = f"{type(error).__name__}: {str(error)[:500]}"
      print(f"{d_in}x{d_out} {name}: failed, {record['failed']}", flush=True)
      write()
      continue
    if runs:
      median = statistics.median(runs)
      record.update(first_call_s=first, runs_s=runs, repeats_run=len(runs),
                    median_s=median, compile_s=first - median)
    else:  # one call only: its time includes the compilation
      record.update(first_call_s=first, runs_s=[], repeats_run=0, median_s=first,
                    compile_s=None,
                    single_call=(f"the warm-up took over once_s = {once_s} s and was the "
                                 "only call: median_s is that call, compilation included"))
      median = first
    record["error"] = None if result.error is None else float(result.error)
    mem = record["memory"].get("total_bytes")
    print(f"{d_in}x{d_out} {name:9s} {median:9.2f} s (first {first:8.2f} s, "
          f"{len(runs)} run(s) after it); XLA memory "
          f"{'?' if mem is None else f'{mem / 2**30:.2f} GiB'}", flush=True)
    write()
    del result


def layers(shapes, solvers, rows, repeats, long_s, once_s, read_gb_s):
  """Every shape in its own child process (see :func:`run_shape`)."""
  record = []
  for d_in, d_out in shapes:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
      path = f.name
    command = [sys.executable, "-m", "benchmarks.scale_layers", "--_child",
               f"{d_in}x{d_out}", "--_child_out", path, "--solvers", ",".join(solvers),
               "--rows", str(rows), "--repeats", str(repeats), "--long_s", str(long_s),
               "--once_s", str(once_s)]
    returncode = subprocess.run(command, check=False).returncode
    entry = dict(d_in=d_in, d_out=d_out)
    if os.path.getsize(path):
      with open(path) as f:
        entry = json.load(f)
    os.unlink(path)
    if returncode:
      entry["child_returncode"] = returncode
      for name in solvers:
        solve = entry.setdefault(name, {})
        if "median_s" not in solve and "skipped" not in solve and "failed" not in solve:
          solve["failed"] = (f"the process ended with code {returncode}"
                             + (" (killed: out of memory?)" if returncode in (-9, 137)
                                else ""))
    if read_gb_s:
      entry["greedy_comq_sweep_s_at_read_bandwidth"] = (
          entry.get("greedy_comq_gram_bytes_per_sweep", 4 * d_out * d_in**2)
          / (read_gb_s * 1e9))
    record.append(entry)
    yield record


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES),
                      help="d_in x d_out list, e.g. 4096x4096,4096x11008")
  parser.add_argument("--solvers", default=",".join(SOLVERS),
                      help=f"a subset of {','.join(SOLVERS)}")
  parser.add_argument("--rows", type=int, default=2048,
                      help="random calibration rows behind each layer's Gram")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--long_s", type=float, default=60.0,
                      help="a warm-up longer than this is followed by one run only")
  parser.add_argument("--once_s", type=float, default=300.0,
                      help="a warm-up longer than this is the only call (not repeated)")
  parser.add_argument("--gram_rows", type=int, default=4096, help="rows of a Gram chunk")
  parser.add_argument("--skip_peaks", action="store_true", help="no bandwidth / GEMM")
  parser.add_argument("--skip_gram", action="store_true", help="no Gram throughput")
  parser.add_argument("--note", default="", help="free text stored in the JSON")
  parser.add_argument("--out", default=None, help="JSON file to write")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_child_out", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  solvers = [s for s in args.solvers.split(",") if s]
  unknown = set(solvers) - set(SOLVERS)
  if unknown:
    parser.error(f"unknown solvers {sorted(unknown)}; choose from {list(SOLVERS)}")
  if args._child:
    d_in, d_out = (int(v) for v in args._child.split("x"))
    run_shape(d_in, d_out, solvers, args.rows, args.repeats, args.long_s, args.once_s,
              args._child_out)
    return
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

  record = dict(
      settings=dict(bits=4, grid="asymmetric", granularity="group", group_size=128,
                    rows=args.rows, repeats=args.repeats, long_s=args.long_s,
                    once_s=args.once_s,
                    gram_rows=args.gram_rows,
                    statistic=("median of repeats after one warm-up call; a warm-up over "
                               "long_s seconds is followed by one run only, one over "
                               "once_s seconds by none (compilation then included)")),
      machine=gptq_official.machine(), note=args.note)

  def write():
    if args.out:
      record["machine"]["load_average_end"] = os.getloadavg()
      with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")

  if not args.skip_peaks:
    record["peaks"] = peaks(args.repeats)
    write()
  if not args.skip_gram:
    record["gram"] = gram_throughput(args.gram_rows, args.repeats, args.long_s)
    write()
  read = record.get("peaks", {}).get("sum", {}).get("gb_s")
  for done in layers(shapes, solvers, args.rows, args.repeats, args.long_s, args.once_s,
                     read):
    record["layers"] = done
    write()


if __name__ == "__main__":
  main()
