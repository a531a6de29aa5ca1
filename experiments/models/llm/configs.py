"""Hyperparameters of the decoder language models, and the named configs of LLM_CONFIGS.

The published models' values are those of their Hugging Face ``config.json``
(HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B,
google/gemma-3-270m); the tiny configs are for tests and small byte-level models.
"""

import dataclasses
from typing import Optional

from experiments.models.llm.layers import Llama3RopeScaling
from experiments.models.llm.layers import RopeSpec


@dataclasses.dataclass(frozen=True)
class DecoderShape:
  """The sizes every decoder family has.

  Attributes:
    vocab_size: tokens in the vocabulary.
    hidden_size: model width.
    intermediate_size: width of the MLP's gate and up projections.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when fewer than num_heads).
    head_dim: features per head.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderShape):
  """A Llama-style decoder (Llama 2/3, SmolLM2, Qwen2): RMSNorm before attention and MLP,
  RoPE, grouped-query attention and a SwiGLU MLP.

  Attributes (besides those of :class:`DecoderShape`):
    rope_theta: RoPE base.
    rope_scaling: optional Llama 3 RoPE scaling.
    rms_norm_eps: epsilon of every RMSNorm.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    tie_embeddings: the output layer is the embedding table (``embed.attend``); otherwise
      a separate ``lm_head`` nnx.Linear.
    max_position_embeddings: the longest context the model was trained for (informative).
  """
  rope_theta: float = 10_000.0
  rope_scaling: Optional[Llama3RopeScaling] = None
  rms_norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = True
  max_position_embeddings: int = 2048

  @property
  def rope(self) -> RopeSpec:
    """The RoPE of every layer."""
    return RopeSpec(self.rope_theta, self.rope_scaling)


@dataclasses.dataclass(frozen=True)
class Gemma3Config(DecoderShape):
  """A Gemma 3 text decoder (Gemma Team, 2025, Gemma 3 Technical Report): QK-norm, norms
  before and after attention and MLP, a GeGLU MLP, and local sliding-window layers
  interleaved with global ones, each kind with its own RoPE base. The head is tied.

  Attributes (besides those of :class:`DecoderShape`):
    sliding_window: positions a local layer sees (its own included).
    query_pre_attn_scalar: queries are scaled by its inverse square root.
    sliding_window_pattern: every this-many-th layer is global, the others local
      (6: five local then one global).
    local_rope_theta: RoPE base of the local layers.
    global_rope_theta: RoPE base of the global layers.
    global_rope_linear_factor: linear RoPE scaling of the global layers (8 in the 4B-27B
      models, 1 for none).
    rms_norm_eps: epsilon of every RMSNorm.
    max_position_embeddings: the longest context the model was trained for (informative).
  """
  sliding_window: int
  query_pre_attn_scalar: float
  sliding_window_pattern: int = 6
  local_rope_theta: float = 10_000.0
  global_rope_theta: float = 1_000_000.0
  global_rope_linear_factor: float = 1.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32_768

  def is_local(self, layer: int) -> bool:
    """Whether block ``layer`` (from 0) uses sliding-window attention."""
    return (layer + 1) % self.sliding_window_pattern != 0

  def rope(self, layer: int) -> RopeSpec:
    """The RoPE of block ``layer``."""
    if self.is_local(layer):
      return RopeSpec(self.local_rope_theta)
    return RopeSpec(self.global_rope_theta, linear_factor=self.global_rope_linear_factor)


LLM_CONFIGS = {
    "smollm2_135m": LlamaConfig(
        vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192),
    "qwen2_5_0_5b": LlamaConfig(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        qkv_bias=True, max_position_embeddings=32_768),
    "llama3_2_1b": LlamaConfig(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500_000.0,
        rope_scaling=Llama3RopeScaling(factor=32.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0,
                                       original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, max_position_embeddings=131_072),
    "gemma3_270m": Gemma3Config(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_layers=18,
        num_heads=4, num_kv_heads=1, head_dim=256, sliding_window=512,
        query_pre_attn_scalar=256),
    # Byte-level (vocab 256) models small enough for tests and embedded experiments.
    # The embedded language model of experiments.llm: trained here on the bundled text in
    # about a minute on 2 CPU cores (configs/base.py, dataset "text").
    "byte_llama": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10_000.0, max_position_embeddings=1024),
    "tiny_llama": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
        rope_scaling=Llama3RopeScaling(factor=4.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0,
                                       original_max_position_embeddings=64),
        max_position_embeddings=256),
    "tiny_qwen": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=1, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=False, max_position_embeddings=256),
    "tiny_gemma3": Gemma3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=2,
        num_kv_heads=1, head_dim=32, sliding_window=4, query_pre_attn_scalar=32,
        max_position_embeddings=256),
}
