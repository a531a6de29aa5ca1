"""Block-wise sequential quantization of Gemma 3 270M: whole-model time per method.

Each measurement is one fresh process (so compilation is included, as a user's first
call pays it) that loads Gemma 3 270M (GGUF from the ``llm-weights`` extra, not
timed), cuts the King James Bible into windows of ``--window`` tokens (the first
``--windows`` training windows, ``--batch`` per calibration batch) and times one call

  ``comq_jax.quantize_model(model, None, windows, solver, inputs="sequential",
  blocks=r"layers/\\d+")``

for RTN, GPTQ and COMQ (one greedy sweep, the official order) at 4 bits, asymmetric,
groups of 128. RTN's time is the floor (it captures the Grams and rounds). Medians of
``--repeats`` processes per method; the ratios are to RTN and to GPTQ.

Usage::

  python -m benchmarks.llm_blockwise --out=benchmarks/results/llm_blockwise_cpu.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SOLVERS = ("rtn", "gptq", "comq")


def gemma_calibration(windows, window, batch):
  """Gemma 3 270M (extra llm-weights) and the first ``windows`` calibration windows of
  ``window`` tokens of the bundled text, as the language-model jobs draw them, in
  batches of ``batch``: ``(model, batches)``."""
  import jax.numpy as jnp  # noqa: PLC0415 (the parent process never imports jax)

  from configs import llm_comq_4bit  # noqa: PLC0415
  from experiments import text  # noqa: PLC0415
  from experiments import text_data  # noqa: PLC0415

  config = llm_comq_4bit.get_config()
  config.model.name = "gemma3_270m"
  source = text_data.model_source(config)
  model = source.build_model(0)
  tokenizer = source.tokenizer(model)
  splits = text.text_windows(text.kjv_text(), window, tokenizer=tokenizer,
                             vocab_size=model.config.vocab_size, eval_fraction=0.1,
                             bos_id=tokenizer.bos_id if tokenizer.add_bos else None)
  tokens = splits.calibration[:windows, :-1]
  return model, [jnp.asarray(tokens[i:i + batch]) for i in range(0, windows, batch)]


def _one(method, windows, window, batch, bits, group_size):
  """Runs one measurement in this process; prints its JSON line."""
  import comq_jax  # noqa: PLC0415 (the parent process never imports jax)

  model, batches = gemma_calibration(windows, window, batch)
  tokens = sum(int(b.size) for b in batches)
  make = getattr(comq_jax, method)
  solver = make(bits, granularity="group", group_size=group_size)
  start = time.perf_counter()
  result = comq_jax.quantize_model(model, None, batches, solver, inputs="sequential",
                                   blocks=r"layers/\d+")
  seconds = time.perf_counter() - start
  timings = result.timings
  print(json.dumps({
      "method": method, "seconds": seconds, "layers": len(result.layers),
      "capture_seconds": timings.capture_seconds, "solve_seconds": timings.solve_seconds,
      "compile_seconds": timings.compile_seconds, "compilations": timings.compilations,
      "error": sum(r.error ** 2 for r in result.layers) ** 0.5,
      "rtn_error": sum(r.rtn_error ** 2 for r in result.layers) ** 0.5,
      "tokens": tokens, "program_bytes": timings.program_bytes}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--windows", type=int, default=128)
  parser.add_argument("--window", type=int, default=513,
                      help="tokens per window (the model reads window - 1)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--group_size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", default=",".join(SOLVERS))
  parser.add_argument("--note", default="")
  parser.add_argument("--out", default=None)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    _one(args.one, args.windows, args.window, args.batch, args.bits, args.group_size)
    return
  runs = {method: [] for method in args.methods.split(",")}
  for repeat in range(args.repeats):
    for method in runs:
      command = [sys.executable, "-m", "benchmarks.llm_blockwise", f"--one={method}",
                 f"--windows={args.windows}", f"--window={args.window}",
                 f"--batch={args.batch}", f"--bits={args.bits}",
                 f"--group_size={args.group_size}"]
      out = subprocess.run(command, capture_output=True, text=True, check=False)
      if out.returncode:
        sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
      run = json.loads(out.stdout.strip().splitlines()[-1])
      runs[method].append(run)
      print(f"repeat {repeat} {method}: {run['seconds']:.1f} s (capture "
            f"{run['capture_seconds']:.1f}, compile {run['compile_seconds']:.1f}), error "
            f"{run['error']:.2f} (RTN {run['rtn_error']:.2f})", flush=True)
  medians = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
  summary = {m: {"median_s": medians[m],
                 "vs_rtn": medians[m] / medians["rtn"] if "rtn" in medians else None,
                 "vs_gptq": medians[m] / medians["gptq"] if "gptq" in medians else None}
             for m in runs}
  for method, row in summary.items():
    print(f"{method}: median {row['median_s']:.1f} s; x RTN {row['vs_rtn']:.2f}; "
          f"x GPTQ {row['vs_gptq']:.2f}")
  if args.out:
    result = {"machine": {"cpu_count": os.cpu_count(), "load_average_end": os.getloadavg()},
              "settings": vars(args), "note": args.note, "summary": summary, "runs": runs}
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
