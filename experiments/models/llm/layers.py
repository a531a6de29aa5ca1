"""Building blocks of decoder language models in Flax NNX: RMSNorm, RoPE, grouped-query
attention with a KV cache, and the gated MLP.

The layouts follow Hugging Face transformers' Llama, Qwen2 and Gemma 3 models (separate
q/k/v/o and gate/up/down projections, RoPE on the two halves of each head), so that their
weights map one to one. Every projection is an ``nnx.Linear``, which is what the quantizers
intercept.
"""

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32.

  Llama/Qwen2 scale the normalized input by ``scale`` (initialized to ones); Gemma scales it
  by ``1 + scale`` (initialized to zeros), selected by ``unit_offset``.
  """

  def __init__(self, dim: int, *, eps: float, unit_offset: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Creates the scale parameter.

    Args:
      dim: size of the normalized (last) axis.
      eps: added to the mean square before the reciprocal square root.
      unit_offset: Gemma's ``x * (1 + scale)`` instead of Llama's ``x * scale``.
      dtype: the output (compute) dtype.
      param_dtype: dtype of ``scale``.
    """
    init = jnp.zeros if unit_offset else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype))
    self.eps = eps
    self.unit_offset = unit_offset
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns ``x`` normalized over its last axis, in the compute dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Explicit leading axes: the test suite forbids implicit rank promotion.
    scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
    if self.unit_offset:
      # Gemma applies (1 + scale) in float32, then casts.
      return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
    # Llama casts the normalized input first, then scales.
    return normed.astype(self.dtype) * scale.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1+ RoPE frequency scaling ("rope_type": "llama3" in the HF config).

  Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided
  by ``factor``, those shorter than ``original_max_position_embeddings / high_freq_factor``
  are kept, and the band between is interpolated smoothly.
  """
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    if not self.high_freq_factor > self.low_freq_factor > 0 or self.factor <= 0:
      raise ValueError("Llama 3 RoPE scaling needs factor > 0 and high_freq_factor > "
                       f"low_freq_factor > 0, got {self}.")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary position embedding settings (Su et al., 2021, RoFormer).

  Attributes:
    theta: the base of the frequencies ``theta ** (-2i / head_dim)``.
    llama3_scaling: optional Llama 3 frequency scaling.
    linear_factor: positions are divided by it (HF "linear" scaling; 1 for none).
  """
  theta: float
  llama3_scaling: Optional[Llama3RopeScaling] = None
  linear_factor: float = 1.0

  def inverse_frequencies(self, head_dim: int) -> np.ndarray:
    """The ``(head_dim // 2,)`` float32 angular frequencies, one per rotated pair."""
    return _inverse_frequencies(self, head_dim)


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(spec: RopeSpec, head_dim: int) -> np.ndarray:
  # Computed in float64 with numpy: static per layer, and exact in the last float32 bit.
  freqs = spec.theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  scaling = spec.llama3_scaling
  if scaling is not None:
    original = scaling.original_max_position_embeddings
    wavelengths = 2 * math.pi / freqs
    smooth = ((original / wavelengths - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    interpolated = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    freqs = np.where(wavelengths < original / scaling.high_freq_factor, freqs,
                     np.where(wavelengths > original / scaling.low_freq_factor,
                              freqs / scaling.factor, interpolated))
  freqs = (freqs / spec.linear_factor).astype(np.float32)
  freqs.setflags(write=False)
  return freqs


def apply_rope(x: jax.Array, positions: jax.Array, inverse_frequencies: np.ndarray) -> jax.Array:
  """Rotates the features of ``x`` by position-dependent angles (RoFormer).

  Feature ``i`` pairs with feature ``i + head_dim // 2`` (the HF "rotate_half" layout).

  Args:
    x: ``(batch, length, heads, head_dim)``.
    positions: ``(length,)`` integer positions.
    inverse_frequencies: ``(head_dim // 2,)``, from :meth:`RopeSpec.inverse_frequencies`.

  Returns:
    The rotated ``x``, in its dtype.
  """
  angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inverse_frequencies)[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention_mask(query_positions: jax.Array, key_positions: jax.Array,
                   sliding_window: Optional[int] = None) -> jax.Array:
  """The ``(queries, keys)`` boolean mask: causal, and with a window, only the
  ``sliding_window`` most recent positions (the query's own included, as in HF)."""
  offset = query_positions[:, None] - key_positions[None, :]
  mask = offset >= 0
  if sliding_window is not None:
    mask &= offset < sliding_window
  return mask


def grouped_query_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                            mask: jax.Array, scale: float) -> jax.Array:
  """Scaled dot-product attention where groups of query heads share a key/value head
  (Ainslie et al., 2023, GQA). Query head ``h`` uses key/value head
  ``h // (heads // kv_heads)``, as HF's ``repeat_kv``.

  Args:
    query: ``(batch, queries, heads, head_dim)``.
    key: ``(batch, keys, kv_heads, head_dim)``.
    value: ``(batch, keys, kv_heads, head_dim)``.
    mask: ``(queries, keys)`` booleans, True where a query may attend.
    scale: multiplies the query-key dot products.

  Returns:
    ``(batch, queries, heads, head_dim)`` in the value's dtype.
  """
  batch, length, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", grouped, key,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[None, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
  return out.reshape(batch, length, heads, head_dim)


class LayerCache(NamedTuple):
  """One attention layer's cached keys and values, ``(batch, max_length, kv_heads,
  head_dim)`` each; slot ``p`` holds position ``p``."""
  keys: jax.Array
  values: jax.Array


class KVCache(NamedTuple):
  """The KV cache of a whole decoder: one :class:`LayerCache` per layer, and ``length``,
  the number of positions already written (an int32 scalar)."""
  layers: tuple
  length: jax.Array


def empty_cache(num_layers: int, batch_size: int, max_length: int, kv_heads: int,
                head_dim: int, dtype) -> KVCache:
  """A zero-filled :class:`KVCache` with room for ``max_length`` positions."""
  shape = (batch_size, max_length, kv_heads, head_dim)
  layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(num_layers))
  return KVCache(layers, jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
  """Multi-head self-attention with grouped key/value heads, RoPE, an optional sliding
  window and optional QK-norm (Gemma 3), reading and writing a :class:`LayerCache`."""

  def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope: RopeSpec, scale: float, qkv_bias: bool = False,
               qk_norm_eps: Optional[float] = None, sliding_window: Optional[int] = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Creates the four projections (and the QK-norms).

    Args:
      hidden_size: model width (input and output features).
      num_heads: query heads.
      num_kv_heads: key/value heads; must divide ``num_heads``.
      head_dim: features per head.
      rope: the layer's rotary embedding.
      scale: multiplies the query-key dot products (``head_dim ** -0.5`` for Llama).
      qkv_bias: biases on the q/k/v projections (Qwen2).
      qk_norm_eps: if set, Gemma RMSNorm of each query and key head (Gemma 3).
      sliding_window: if set, each query sees only this many most recent positions.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initializer randomness.
    """
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}).")
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(hidden_size, num_heads * head_dim, use_bias=qkv_bias)
    self.k_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias)
    self.v_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias)
    self.o_proj = linear(num_heads * head_dim, hidden_size, use_bias=False)
    if qk_norm_eps is None:
      self.q_norm = self.k_norm = None
    else:
      norm = functools.partial(RMSNorm, head_dim, eps=qk_norm_eps, unit_offset=True,
                               dtype=dtype, param_dtype=param_dtype)
      self.q_norm, self.k_norm = norm(), norm()
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope = rope
    self.scale = scale
    self.sliding_window = sliding_window

  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: Optional[LayerCache] = None):
    """Attends over the sequence, or over the cache once this step is written into it.

    Args:
      x: ``(batch, length, hidden_size)``.
      positions: ``(length,)`` consecutive positions of the tokens of ``x``.
      cache: optional; the new keys/values are written at ``positions[0]``.

    Returns:
      ``(output, cache)``: the ``(batch, length, hidden_size)`` output and the updated cache
      (None without one).
    """
    batch, length, _ = x.shape
    query = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
    key = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    value = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      query, key = self.q_norm(query), self.k_norm(key)
    frequencies = self.rope.inverse_frequencies(self.head_dim)
    query = apply_rope(query, positions, frequencies)
    key = apply_rope(key, positions, frequencies)
    key_positions = positions
    if cache is not None:
      start = (0, positions[0], 0, 0)
      cache = LayerCache(
          jax.lax.dynamic_update_slice(cache.keys, key.astype(cache.keys.dtype), start),
          jax.lax.dynamic_update_slice(cache.values, value.astype(cache.values.dtype), start))
      key, value = cache
      # Slots past the last written position fail the causal test, so they need no mask.
      key_positions = jnp.arange(key.shape[1])
    mask = attention_mask(positions, key_positions, self.sliding_window)
    out = grouped_query_attention(query, key, value, mask, self.scale)
    return self.o_proj(out.reshape(batch, length, -1)), cache


class GatedMLP(nnx.Module):
  """``down(act(gate(x)) * up(x))``: SwiGLU with SiLU (Llama), GeGLU with tanh-GELU (Gemma)
  (Shazeer, 2020, GLU Variants Improve Transformer)."""

  def __init__(self, hidden_size: int, intermediate_size: int, activation, *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Creates the gate, up and down projections.

    Args:
      hidden_size: input and output features.
      intermediate_size: features of the gate and up projections.
      activation: applied to the gate, e.g. ``jax.nn.silu``.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initializer randomness.
    """
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(hidden_size, intermediate_size)
    self.up_proj = linear(hidden_size, intermediate_size)
    self.down_proj = linear(intermediate_size, hidden_size)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns the MLP output, same shape as ``x``."""
    return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
