"""Decoder language models in Flax NNX, picked by name through LLM_CONFIGS / create_llm.

Two families: :class:`Llama` (Llama 3, SmolLM2, Qwen2: RMSNorm, RoPE with optional Llama 3
scaling, grouped-query attention, SwiGLU, optional q/k/v biases, tied or separate head) and
:class:`Gemma3` (QK-norm, pre- and post-norms, scaled embeddings, local/global attention).
Every projection is an ``nnx.Linear`` and a tied head is ``embed.attend``, which is how
comq_jax / quant_core find them. ``model(tokens)`` gives logits;
``model.forward_with_cache(tokens, cache)`` and :func:`generate` decode with a KV cache,
in float or, with ``packed_variables``, through the packed ``quantized_matmul`` kernels.
"""

from experiments.models.llm.build import MODEL_CLASSES
from experiments.models.llm.build import abstract_llm
from experiments.models.llm.build import count_params
from experiments.models.llm.build import create_llm
from experiments.models.llm.build import llm_config
from experiments.models.llm.configs import LLM_CONFIGS
from experiments.models.llm.configs import Gemma3Config
from experiments.models.llm.configs import LlamaConfig
from experiments.models.llm.decoder import CausalLM
from experiments.models.llm.decoder import Llama
from experiments.models.llm.decoder import LlamaBlock
from experiments.models.llm.gemma3 import Gemma3
from experiments.models.llm.gemma3 import Gemma3Block
from experiments.models.llm.generate import cached_forward
from experiments.models.llm.generate import generate
from experiments.models.llm.generate import generate_with_logits
from experiments.models.llm.layers import Attention
from experiments.models.llm.layers import GatedMLP
from experiments.models.llm.layers import KVCache
from experiments.models.llm.layers import LayerCache
from experiments.models.llm.layers import Llama3RopeScaling
from experiments.models.llm.layers import RMSNorm
from experiments.models.llm.layers import RopeSpec
from experiments.models.llm.layers import apply_rope
from experiments.models.llm.layers import attention_mask
from experiments.models.llm.layers import grouped_query_attention

__all__ = [
    "LLM_CONFIGS", "MODEL_CLASSES", "Attention", "CausalLM", "GatedMLP", "Gemma3",
    "Gemma3Block", "Gemma3Config", "KVCache", "LayerCache", "Llama", "Llama3RopeScaling",
    "LlamaBlock", "LlamaConfig", "RMSNorm", "RopeSpec", "abstract_llm", "apply_rope",
    "attention_mask", "cached_forward", "count_params", "create_llm", "generate",
    "generate_with_logits", "grouped_query_attention", "llm_config",
]
