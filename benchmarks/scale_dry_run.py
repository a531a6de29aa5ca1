"""Dry run of block-wise quantization at Llama-2 scale: shapes only, nothing allocated.

Builds a Llama-2-7B-shaped (or 70B-shaped) decoder abstractly (``nnx.eval_shape``: the
shapes of meta-llama/Llama-2-7b-hf's and Llama-2-70b-hf's ``config.json``), walks the
block plan that ``comq_jax.quantize_model(..., blocks=r"layers/\\d+")`` follows
(``comq_jax.plan_blocks``), and prints, per block, its layers and the memory the
block-wise driver holds: the block's parameters, the Grams of its largest group of
layers (``inputs="sequential"``) or of all its layers (``"fp"``), and the calibration
hidden states (inputs and outputs, float32).

Usage::

  python -m benchmarks.scale_dry_run --model=llama2_7b --sequences=128 --length=2048
"""

import argparse
import json

from flax import nnx
import jax
import jax.numpy as jnp

import comq_jax
from experiments.models.llm.configs import LlamaConfig
from experiments.models.llm.decoder import Llama

# meta-llama/Llama-2-7b-hf and Llama-2-70b-hf config.json.
MODELS = {
    "llama2_7b": LlamaConfig(
        vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
        tie_embeddings=False, max_position_embeddings=4096),
    "llama2_70b": LlamaConfig(
        vocab_size=32_000, hidden_size=8192, intermediate_size=28_672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        tie_embeddings=False, max_position_embeddings=4096),
}


def dry_run(name, sequences, length, param_dtype=jnp.bfloat16):
  """The block plan of model ``name`` and its memory per block (bytes)."""
  config = MODELS[name]
  model = nnx.eval_shape(lambda: Llama(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  batch = jax.ShapeDtypeStruct((1, length), jnp.int32)
  blocks, outside = comq_jax.plan_blocks(model, None, batch, blocks=r"layers/\d+")
  tokens = sequences * length
  hidden = 2 * tokens * config.hidden_size * 4  # a block's inputs and outputs, float32
  gram = lambda group: sum(4 * d_in * d_in * groups for _, groups, d_in, _ in group)
  rows = []
  for block in blocks:
    rows.append({
        "block": block["block"], "param_bytes": block["param_bytes"],
        "layers": [layer for group in block["groups"] for layer in group],
        "sequential_gram_bytes": max(gram(group) for group in block["groups"]),
        "fp_gram_bytes": sum(gram(group) for group in block["groups"]),
        "hidden_bytes": hidden})
  params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return {"model": name, "params": int(params), "tokens": tokens, "blocks": rows,
          "outside": outside,
          "anchors": [block["block"] for block in blocks if block["anchor"]]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="llama2_7b", choices=sorted(MODELS))
  parser.add_argument("--sequences", type=int, default=128)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  plan = dry_run(args.model, args.sequences, args.length)
  gib = 2.0 ** 30
  first = plan["blocks"][0]
  print(f"{args.model}: {plan['params'] / 1e9:.2f}B parameters, {len(plan['blocks'])} "
        f"blocks; calibration {plan['tokens']} tokens; inputs from the whole model for "
        f"{plan['anchors']}")
  print("block 0 layers (path, groups, d_in, d_out):")
  for layer in first["layers"]:
    print(f"  {layer}")
  print(f"per block: parameters {first['param_bytes'] / gib:.2f} GiB (bf16), Grams "
        f"{first['sequential_gram_bytes'] / gib:.2f} GiB (sequential, largest group) or "
        f"{first['fp_gram_bytes'] / gib:.2f} GiB (fp), hidden states "
        f"{first['hidden_bytes'] / gib:.2f} GiB (in and out, float32)")
  print(f"outside the blocks (one whole-model pass each): {plan['outside']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(plan, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
