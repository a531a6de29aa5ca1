"""Gemma 3 text decoders in Flax NNX (Gemma Team, 2025, Gemma 3 Technical Report).

Differences from Llama: RMSNorm scales by ``1 + scale``; queries and keys are RMS-normed per
head (QK-norm); attention and MLP have norms both before and after, inside the residual;
embeddings are multiplied by ``sqrt(hidden_size)``; queries are scaled by
``query_pre_attn_scalar ** -0.5``; the MLP is gated with tanh-approximated GELU; five local
sliding-window layers (RoPE base 10,000) alternate with one global layer (base 1,000,000);
the head is tied to the embeddings.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models.llm.configs import Gemma3Config
from experiments.models.llm.decoder import CausalLM
from experiments.models.llm.layers import Attention
from experiments.models.llm.layers import GatedMLP
from experiments.models.llm.layers import LayerCache
from experiments.models.llm.layers import RMSNorm

gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)


class Gemma3Block(nnx.Module):
  """A Gemma 3 decoder block: ``x + post_norm(attn(pre_norm(x)))``, then
  ``x + post_norm(mlp(pre_norm(x)))``; local (sliding-window) or global attention."""

  def __init__(self, config: Gemma3Config, layer: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Creates the four norms, the attention and the MLP.

    Args:
      config: the model's hyperparameters.
      layer: the block's index (from 0), which decides local or global attention.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initializer randomness.
    """
    norm = functools.partial(RMSNorm, config.hidden_size, eps=config.rms_norm_eps,
                             unit_offset=True, dtype=dtype, param_dtype=param_dtype)
    self.input_norm = norm()
    self.attn = Attention(
        config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
        rope=config.rope(layer), scale=config.query_pre_attn_scalar ** -0.5,
        qk_norm_eps=config.rms_norm_eps,
        sliding_window=config.sliding_window if config.is_local(layer) else None,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_norm = norm()
    self.pre_feedforward_norm = norm()
    self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, gelu_tanh,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_feedforward_norm = norm()

  def __call__(self, x, positions, cache: Optional[LayerCache] = None):
    """Returns ``(x, cache)``; see :meth:`Attention.__call__`."""
    attended, cache = self.attn(self.input_norm(x), positions, cache)
    x = x + self.post_attention_norm(attended)
    return x + self.post_feedforward_norm(self.mlp(self.pre_feedforward_norm(x))), cache


class Gemma3(CausalLM):
  """A Gemma 3 text decoder language model with a tied head.

  Called as ``model(tokens)`` for logits; see :class:`CausalLM` for the cached forward.
  """

  def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    """Creates the embedding table, the blocks and the final norm.

    Args:
      config: the model's hyperparameters.
      dtype: compute dtype (activations, logits before the float32 cast, KV cache).
      param_dtype: parameter dtype.
      rngs: initializer randomness.
    """
    blocks = [Gemma3Block(config, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
              for layer in range(config.num_layers)]
    final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, unit_offset=True,
                         dtype=dtype, param_dtype=param_dtype)
    self._build(config, blocks, final_norm, None, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Embeddings times ``sqrt(hidden_size)``, the factor rounded to the compute dtype
    (as in the reference implementation)."""
    scale = jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
    return self.embed(tokens) * scale
