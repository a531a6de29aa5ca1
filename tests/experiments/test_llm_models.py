"""Decoder language models of experiments.models.llm: parameter counts of the published
configs, forward shapes, KV-cache decoding, RoPE, grouped-query attention, Gemma 3's sliding
window and tied head, and that comq_jax finds every linear layer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import comq_jax
from experiments.models import llm

# Exact totals of the Hugging Face checkpoints (embeddings counted once: tied heads).
PUBLISHED_PARAMETER_COUNTS = {
    "smollm2_135m": 134_515_008,
    "qwen2_5_0_5b": 494_032_768,
    "llama3_2_1b": 1_235_814_400,
    "gemma3_270m": 268_098_176,
}
TINY_MODELS = ["tiny_llama", "tiny_qwen", "tiny_gemma3"]

# One compiled program per model structure: much faster than op-by-op dispatch.
forward = nnx.jit(lambda model, tokens: model(tokens))


def random_tokens(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, shape), jnp.int32)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_published_configs_have_the_checkpoints_parameter_counts(name):
  model = llm.abstract_llm(name)
  assert llm.count_params(model) == PUBLISHED_PARAMETER_COUNTS[name]
  # eval_shape allocated nothing.
  assert all(isinstance(leaf, jax.ShapeDtypeStruct)
             for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_forward_gives_float32_logits_for_every_position(name):
  model = llm.create_llm(name)
  logits = forward(model, random_tokens((2, 7)))
  assert logits.shape == (2, 7, 256)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_parameters_and_compute():
  model = llm.create_llm("tiny_gemma3", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {leaf.dtype for leaf in params} == {jnp.dtype(jnp.bfloat16)}
  logits = forward(model, random_tokens((1, 5)))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_cached_generation_matches_the_full_forward_at_every_step(name):
  model = llm.create_llm(name)
  prompt_length, new = 5, 6  # 11 positions: past tiny_gemma3's window of 4
  tokens, step_logits = llm.generate_with_logits(model, random_tokens((2, prompt_length)),
                                                 new)
  assert tokens.shape == (2, prompt_length + new) and step_logits.shape == (2, new, 256)
  full = np.asarray(forward(model, tokens))[:, prompt_length - 1:-1]
  np.testing.assert_allclose(np.asarray(step_logits), full, rtol=1e-5, atol=1e-5)
  # Greedy: each new token is the argmax of the logits it was chosen from.
  np.testing.assert_array_equal(np.asarray(tokens[:, prompt_length:]),
                                np.asarray(step_logits).argmax(-1))


def test_generate_samples_with_a_key_and_keeps_a_1d_prompt_1d():
  model = llm.create_llm("tiny_qwen")
  prompt = random_tokens((4,))
  with pytest.raises(ValueError, match="rng"):
    llm.generate(model, prompt, 2, temperature=1.0)
  key = jax.random.key(3)
  sampled = llm.generate(model, prompt, 2, temperature=1.0, rng=key)
  assert sampled.shape == (6,)
  np.testing.assert_array_equal(np.asarray(sampled[:4]), np.asarray(prompt))
  np.testing.assert_array_equal(
      np.asarray(sampled), np.asarray(llm.generate(model, prompt, 2, temperature=1.0, rng=key)))


@pytest.mark.parametrize("rope", [
    llm.RopeSpec(10_000.0),
    llm.RopeSpec(500_000.0, llm.Llama3RopeScaling(32.0, 1.0, 4.0, 8192)),
    llm.RopeSpec(1_000_000.0, linear_factor=8.0),
], ids=["plain", "llama3", "linear"])
def test_rope_scores_depend_only_on_the_position_difference(rope):
  head_dim, length = 16, 12
  rng = np.random.RandomState(1)
  query, key = (jnp.asarray(np.broadcast_to(rng.randn(1, 1, 1, head_dim),
                                            (1, length, 1, head_dim)), jnp.float32)
                for _ in range(2))
  positions = jnp.arange(length)
  frequencies = rope.inverse_frequencies(head_dim)
  rotated_query = np.asarray(llm.apply_rope(query, positions, frequencies))[0, :, 0]
  rotated_key = np.asarray(llm.apply_rope(key, positions, frequencies))[0, :, 0]
  scores = rotated_query @ rotated_key.T  # scores[m, n] = q_m . k_n
  # A Toeplitz matrix: shifting both positions leaves the score unchanged.
  np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-4)
  assert np.ptp(np.diag(scores, -3)) < 1e-4 < np.ptp(scores[:, 0])
  # Rotations keep norms.
  np.testing.assert_allclose(np.linalg.norm(rotated_query, axis=-1),
                             np.linalg.norm(np.asarray(query)[0, :, 0], axis=-1), rtol=1e-5)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
  scaling = llm.Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
  plain = llm.RopeSpec(500_000.0).inverse_frequencies(64)
  scaled = llm.RopeSpec(500_000.0, scaling).inverse_frequencies(64)
  wavelengths = 2 * math.pi / plain
  high, low = wavelengths < 8192 / 4, wavelengths > 8192
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_array_equal(scaled[high], plain[high])
  np.testing.assert_allclose(scaled[low], plain[low] / 32, rtol=1e-6)
  middle = ~high & ~low
  assert (scaled[middle] < plain[middle]).all() and (scaled[middle] > plain[middle] / 32).all()


def test_grouped_query_attention_matches_a_per_head_numpy_computation():
  batch, queries, keys, heads, kv_heads, head_dim = 2, 3, 5, 6, 2, 8
  rng = np.random.RandomState(2)
  query = rng.randn(batch, queries, heads, head_dim).astype(np.float32)
  key = rng.randn(batch, keys, kv_heads, head_dim).astype(np.float32)
  value = rng.randn(batch, keys, kv_heads, head_dim).astype(np.float32)
  query_positions = np.arange(queries) + keys - queries  # the last `queries` positions
  mask = query_positions[:, None] >= np.arange(keys)[None, :]
  scale = head_dim ** -0.5
  expected = np.zeros_like(query)
  for b in range(batch):
    for h in range(heads):
      shared = h // (heads // kv_heads)  # heads 0-2 read kv head 0, heads 3-5 kv head 1
      logits = query[b, :, h] @ key[b, :, shared].T * scale
      logits = np.where(mask, logits, -np.inf)
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      expected[b, :, h] = weights @ value[b, :, shared]
  mask_jax = llm.attention_mask(jnp.asarray(query_positions, jnp.int32), jnp.arange(keys))
  np.testing.assert_array_equal(np.asarray(mask_jax), mask)
  out = llm.grouped_query_attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value),
                                    mask_jax, scale)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_gemma3_local_layers_ignore_tokens_beyond_the_window():
  config = llm.LLM_CONFIGS["tiny_gemma3"]
  window, length = config.sliding_window, 10
  rngs = nnx.Rngs(0)
  local, global_ = (llm.Gemma3Block(config, layer, rngs=rngs) for layer in (0, 5))
  assert local.attn.sliding_window == window and global_.attn.sliding_window is None
  x = jnp.asarray(np.random.RandomState(4).randn(1, length, config.hidden_size), jnp.float32)
  changed = x.at[0, 0].set(-x[0, 0])
  forward_block = nnx.jit(lambda block, inputs: block(inputs, jnp.arange(length))[0])

  def change(block):
    """Per position, how much the block's output moves when token 0 changes."""
    outputs = (np.asarray(forward_block(block, inputs))[0] for inputs in (x, changed))
    return np.abs(next(outputs) - next(outputs)).max(-1)

  # Position p of a local layer sees p - window + 1 .. p: token 0 reaches only the first
  # `window` positions, bit for bit.
  local_change = change(local)
  assert (local_change[window:] == 0).all() and (local_change[:window] > 1e-3).all()
  assert (change(global_) > 1e-3).all()


def test_gemma3_layer_pattern_rope_bases_and_embedding_scale():
  config = llm.LLM_CONFIGS["gemma3_270m"]
  assert [layer for layer in range(18) if not config.is_local(layer)] == [5, 11, 17]
  assert config.rope(0).theta == 10_000.0 and config.rope(5).theta == 1_000_000.0
  model = llm.create_llm("tiny_gemma3")
  tokens = random_tokens((1, 3))
  np.testing.assert_allclose(np.asarray(model.embed_tokens(tokens)),
                             np.asarray(model.embed(tokens)) * 8.0, rtol=1e-6)
  # Gemma's norm scales by 1 + scale, starting from scale = 0.
  norm = model.final_norm
  x = jnp.asarray([[3.0, 4.0]], jnp.float32)
  gemma_norm = llm.RMSNorm(2, eps=0.0, unit_offset=True)
  gemma_norm.scale[...] = jnp.asarray([0.5, 1.0], jnp.float32)
  expected = np.asarray([[3.0, 4.0]]) / math.sqrt(12.5) * np.asarray([1.5, 2.0])
  np.testing.assert_allclose(np.asarray(gemma_norm(x)), expected, rtol=1e-6)
  assert norm.unit_offset and not np.asarray(norm.scale[...]).any()


@pytest.mark.parametrize("name,tied", [("tiny_llama", True), ("tiny_gemma3", True),
                                       ("tiny_qwen", False)])
def test_a_tied_head_calls_embed_attend(name, tied, monkeypatch):
  model = llm.create_llm(name)
  attended = []
  attend = nnx.Embed.attend

  def recording_attend(module, query):
    attended.append((type(module), query.shape))
    return attend(module, query)

  monkeypatch.setattr(nnx.Embed, "attend", recording_attend)
  nnx.eval_shape(lambda model: model(random_tokens((1, 3))), model)  # traces, runs nothing
  if tied:
    # Once, on the embedding table, for the final hidden states of the 3 tokens.
    assert attended == [(nnx.Embed, (1, 3, 64))] and model.lm_head is None
  else:
    assert attended == [] and isinstance(model.lm_head, nnx.Linear)


def test_unknown_model_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="known models: .*gemma3_270m.*smollm2_135m"):
    llm.create_llm("llama9_000b")


def test_comq_quantizes_every_linear_layer_and_skips_the_tied_embedding():
  model = llm.create_llm("tiny_llama")
  result = comq_jax.quantize_model(model, None, [random_tokens((2, 8))],
                                   comq_jax.rtn(bits=4))
  linear_paths = {"/".join(map(str, path)) for path, module in nnx.iter_modules(model)
                  if isinstance(module, nnx.Linear)}
  assert len(linear_paths) == 7 * 4
  assert {layer.path for layer in result.layers} == linear_paths
  assert [(skipped.path, skipped.kind) for skipped in result.skipped] == [("embed", "embedding")]
