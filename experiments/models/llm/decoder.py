"""Llama-style decoder language models in Flax NNX (Llama 2/3, SmolLM2, Qwen2), and the
base class they share with Gemma 3.

Touvron et al., 2023, Llama 2; Grattafiori et al., 2024, The Llama 3 Herd of Models; Qwen
Team, 2024, Qwen2.5. Each block is pre-norm: ``x + attn(norm(x))``, then
``x + mlp(norm(x))``.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models.llm.configs import LlamaConfig
from experiments.models.llm.layers import Attention
from experiments.models.llm.layers import GatedMLP
from experiments.models.llm.layers import KVCache
from experiments.models.llm.layers import LayerCache
from experiments.models.llm.layers import RMSNorm
from experiments.models.llm.layers import empty_cache


class CausalLM(nnx.Module):
  """A decoder-only language model: ``embed`` (nnx.Embed), ``layers`` (an nnx.List of
  blocks called as ``block(x, positions, layer_cache) -> (x, layer_cache)``),
  ``final_norm`` and ``lm_head`` (an nnx.Linear, or None for a head tied to ``embed``).

  Subclasses build them with :meth:`_build`; they may override :meth:`embed_tokens`.
  """

  def _build(self, config, blocks, final_norm, lm_head, *, dtype, param_dtype, rngs):
    """Sets ``config``, ``dtype``, the embedding table and the given parts."""
    self.config = config
    self.dtype = dtype
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List(blocks)
    self.final_norm = final_norm
    self.lm_head = lm_head

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The ``(batch, length, hidden_size)`` input embeddings of ``tokens``."""
    return self.embed(tokens)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Returns the float32 ``(batch, length, vocab_size)`` next-token logits.

    Args:
      tokens: ``(batch, length)`` integer token ids, at positions ``0 .. length - 1``.
    """
    positions = jnp.arange(tokens.shape[1])
    logits, _ = self._forward(tokens, positions, None)
    return logits

  def forward_with_cache(self, tokens: jax.Array, cache: KVCache):
    """Runs ``tokens`` after the ``cache.length`` positions already in ``cache``.

    Args:
      tokens: ``(batch, length)`` token ids; ``cache.length + length`` must not exceed the
        cache's size (writes past it are clipped by XLA, silently).
      cache: from :meth:`init_cache` or a previous call.

    Returns:
      ``(logits, cache)``: float32 ``(batch, length, vocab_size)`` logits, equal to those of
      the full sequence's forward pass at these positions, and the extended cache.
    """
    positions = cache.length + jnp.arange(tokens.shape[1])
    logits, layers = self._forward(tokens, positions, cache.layers)
    return logits, KVCache(layers, cache.length + tokens.shape[1])

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``max_length``
    tokens, in the compute dtype."""
    attention = self.layers[0].attn
    return empty_cache(len(self.layers), batch_size, max_length, attention.num_kv_heads,
                       attention.head_dim, self.dtype)

  def _forward(self, tokens, positions, layer_caches: Optional[tuple]):
    x = self.embed_tokens(tokens)
    new_caches = []
    for index, block in enumerate(self.layers):
      layer_cache: Optional[LayerCache] = None if layer_caches is None else layer_caches[index]
      x, layer_cache = block(x, positions, layer_cache)
      new_caches.append(layer_cache)
    x = self.final_norm(x)
    # A tied head is the embedding table's attend; the quantizers recognize that call.
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32), (None if layer_caches is None else tuple(new_caches))


class LlamaBlock(nnx.Module):
  """A pre-norm Llama decoder block: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU
  MLP -> residual."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    """Creates the norms, the attention and the MLP.

    Args:
      config: the model's hyperparameters.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initializer randomness.
    """
    norm_options = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.input_norm = RMSNorm(config.hidden_size, **norm_options)
    self.attn = Attention(
        config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
        rope=config.rope, scale=config.head_dim ** -0.5, qkv_bias=config.qkv_bias,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_norm = RMSNorm(config.hidden_size, **norm_options)
    self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, jax.nn.silu,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, cache: Optional[LayerCache] = None):
    """Returns ``(x, cache)``; see :meth:`Attention.__call__`."""
    attended, cache = self.attn(self.input_norm(x), positions, cache)
    x = x + attended
    return x + self.mlp(self.post_attention_norm(x)), cache


class Llama(CausalLM):
  """A Llama-style decoder language model (Llama 3, SmolLM2, Qwen2, ...).

  Called as ``model(tokens)`` for logits; see :class:`CausalLM` for the cached forward.
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    """Creates the embedding table, the blocks, the final norm and the head.

    Args:
      config: the model's hyperparameters.
      dtype: compute dtype (activations, logits before the float32 cast, KV cache).
      param_dtype: parameter dtype.
      rngs: initializer randomness.
    """
    blocks = [LlamaBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
              for _ in range(config.num_layers)]
    final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                         param_dtype=param_dtype)
    lm_head = None if config.tie_embeddings else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self._build(config, blocks, final_norm, lm_head, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs)
