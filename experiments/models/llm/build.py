"""Building decoder language models by name, and counting their parameters without
allocating them."""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models.llm.configs import LLM_CONFIGS
from experiments.models.llm.configs import Gemma3Config
from experiments.models.llm.configs import LlamaConfig
from experiments.models.llm.decoder import CausalLM
from experiments.models.llm.decoder import Llama
from experiments.models.llm.gemma3 import Gemma3

MODEL_CLASSES = {LlamaConfig: Llama, Gemma3Config: Gemma3}


def llm_config(name: str):
  """The config registered as ``name`` in LLM_CONFIGS.

  Raises:
    ValueError: for an unknown name; the message lists the known ones.
  """
  if name not in LLM_CONFIGS:
    raise ValueError(f"Unknown language model {name!r}; known models: "
                     f"{', '.join(sorted(LLM_CONFIGS))}.")
  return LLM_CONFIGS[name]


def create_llm(name: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: Optional[nnx.Rngs] = None) -> CausalLM:
  """Builds the model named ``name`` in LLM_CONFIGS, randomly initialized.

  Args:
    name: e.g. ``"smollm2_135m"``, ``"gemma3_270m"``, ``"tiny_llama"``.
    dtype: compute dtype (float32 by default, what CPUs run best).
    param_dtype: parameter dtype.
    rngs: initializer randomness (``nnx.Rngs(0)`` when None).

  Returns:
    A :class:`Llama` or :class:`Gemma3`.

  Raises:
    ValueError: for an unknown name; the message lists the known ones.
  """
  config = llm_config(name)
  model_class = MODEL_CLASSES[type(config)]
  return model_class(config, dtype=dtype, param_dtype=param_dtype,
                     rngs=nnx.Rngs(0) if rngs is None else rngs)


def count_params(model: nnx.Module) -> int:
  """The number of scalars in ``model``'s nnx.Param variables (works on the abstract model
  of :func:`abstract_llm` too)."""
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_llm(name: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> CausalLM:
  """The model named ``name`` with shapes and dtypes only (``nnx.eval_shape``): nothing is
  allocated, so even the largest configs are cheap to inspect."""
  return nnx.eval_shape(lambda: create_llm(name, dtype=dtype, param_dtype=param_dtype))
