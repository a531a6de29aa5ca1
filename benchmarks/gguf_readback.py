"""Perplexity of exported GGUF files, read back, against the runs that wrote them.

For every run under ``--workdir`` with a ``model.gguf`` (``--config.export=gguf``, e.g. the
sweep of configs/gguf_export_gemma), loads the file with our importer
(``experiments.importers.load_gguf``) and its tokenizer from the file's own metadata,
rebuilds the run's held-out windows from its ``config.json`` with that tokenizer, and
computes the perplexity. It prints, and writes to ``--out``, one row per run: the run's
reported FP and quantized perplexity, the read-back perplexity, their relative difference
(summation order only: the weights read back are the run's, bit for bit), the tensor types
in the file and its size.

    PYTHONPATH=. python -m benchmarks.gguf_readback \\
        --workdir=workdirs/sweeps/gguf_export_gemma \\
        --out=benchmarks/results/gguf_export_gemma3_270m_cpu.json
"""

import collections
import datetime
import json
import os

from absl import app
from absl import flags
import ml_collections

from experiments import importers
from experiments import text
from experiments import text_data

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder searched for runs with a model.gguf.")
flags.DEFINE_string("out", None, "JSON file to write (optional).")


def readback(run_dir):
  """One row: the run's figures and the read-back perplexity of its model.gguf."""
  with open(os.path.join(run_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(run_dir, "results.json")) as f:
    results = json.load(f)
  path = os.path.join(run_dir, "model.gguf")
  model = importers.load_gguf(path, config.model.name)
  tokenizer = importers.tokenizer_from_gguf(path, model=model)
  windows = text_data.create_text_dataset(config, tokenizer,
                                          model.config.vocab_size).eval_windows
  value = text.perplexity(model, windows, batch_size=config.eval_batch_size)
  reader = importers.open_gguf(path)
  types = collections.Counter(tensor.tensor_type.name for tensor in reader.tensors)
  method = config.method
  return {"run": os.path.basename(run_dir), "method": method,
          "grid": config[method].grid, "bits": config[method].bits,
          "group_size": config[method].group_size,
          "fp_perplexity": results["fp_perplexity"],
          "run_perplexity": results["perplexity"], "gguf_perplexity": value,
          "relative_difference": abs(value - results["perplexity"]) / results["perplexity"],
          "eval_windows": int(windows.shape[0]), "window_length": int(windows.shape[1]),
          "tensor_types": dict(sorted(types.items())),
          "file_mib": round(os.path.getsize(path) / 2**20, 1),
          "quantize_seconds": results["seconds"].get(f"{method}/quantize")}


def main(argv):
  del argv
  runs = sorted(root for root, _, names in os.walk(FLAGS.workdir)
                if "model.gguf" in names and "results.json" in names)
  if not runs:
    raise app.UsageError(f"No run with model.gguf and results.json under {FLAGS.workdir}.")
  rows = []
  for run_dir in runs:
    row = readback(run_dir)
    rows.append(row)
    print(json.dumps(row), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"date": datetime.date.today().isoformat(), "device": "cpu",
                 "workdir": FLAGS.workdir, "rows": rows}, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
