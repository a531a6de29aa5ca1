"""Hugging Face checkpoints into the decoder language models of experiments.models.llm.

A Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Gemma3ForCausalLM`` state dict
is a flat mapping from key names (``model.layers.3.self_attn.q_proj.weight``) to arrays in
torch's layout: a linear layer's weight is ``(out_features, in_features)``, which is the
transpose of an ``nnx.Linear`` kernel. :func:`hf_key_map` lists, for a config, every key
the checkpoint must have and where it lands in our model; :func:`load_hf_state_dict` copies a
mapping of numpy arrays into a model, checking that no key is missing, extra or misshapen.

Gemma's RMSNorm multiplies by ``1 + weight`` both in transformers and in our
``RMSNorm(unit_offset=True)``, so its norm weights are copied unchanged.
"""

import dataclasses
import os
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.models.llm import MODEL_CLASSES
from experiments.models.llm import CausalLM
from experiments.models.llm import Gemma3Config
from experiments.models.llm import LlamaConfig
from experiments.models.llm import llm_config

ModelSpec = Union[str, LlamaConfig, Gemma3Config, CausalLM]


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one checkpoint tensor lands.

  Attributes:
    path: attribute path in the model, an int for an index into ``layers``
      (e.g. ``("layers", 3, "attn", "q_proj", "kernel")``).
    shape: the checkpoint tensor's shape (torch layout).
    transpose: the tensor is a torch linear weight, stored transposed as an nnx kernel.
  """
  path: tuple
  shape: tuple
  transpose: bool = False


def _linear(path: tuple, in_features: int, out_features: int) -> Target:
  return Target(path + ("kernel",), (out_features, in_features), transpose=True)


def hf_key_map(config: Union[LlamaConfig, Gemma3Config]) -> dict:
  """Every tensor of the Hugging Face checkpoint of a model with this config.

  Args:
    config: a :class:`LlamaConfig` (Llama, SmolLM2, Qwen2) or :class:`Gemma3Config`.

  Returns:
    An ordered dict from Hugging Face key to :class:`Target`.

  Raises:
    ValueError: for any other config type.
  """
  if not isinstance(config, (LlamaConfig, Gemma3Config)):
    raise ValueError(f"config must be a LlamaConfig or Gemma3Config, got "
                     f"{type(config).__name__}.")
  gemma = isinstance(config, Gemma3Config)
  hidden, q_size = config.hidden_size, config.num_heads * config.head_dim
  kv_size = config.num_kv_heads * config.head_dim
  keys = {"model.embed_tokens.weight": Target(("embed", "embedding"),
                                              (config.vocab_size, hidden))}
  for i in range(config.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    attn = ours + ("attn",)
    keys[hf + "input_layernorm.weight"] = Target(ours + ("input_norm", "scale"), (hidden,))
    for name, size in [("q", q_size), ("k", kv_size), ("v", kv_size)]:
      keys[hf + f"self_attn.{name}_proj.weight"] = _linear(attn + (f"{name}_proj",), hidden,
                                                           size)
      if not gemma and config.qkv_bias:
        keys[hf + f"self_attn.{name}_proj.bias"] = Target(attn + (f"{name}_proj", "bias"),
                                                          (size,))
    keys[hf + "self_attn.o_proj.weight"] = _linear(attn + ("o_proj",), q_size, hidden)
    if gemma:
      for name in ("q", "k"):
        keys[hf + f"self_attn.{name}_norm.weight"] = Target(attn + (f"{name}_norm", "scale"),
                                                            (config.head_dim,))
    keys[hf + "post_attention_layernorm.weight"] = Target(
        ours + ("post_attention_norm", "scale"), (hidden,))
    if gemma:
      keys[hf + "pre_feedforward_layernorm.weight"] = Target(
          ours + ("pre_feedforward_norm", "scale"), (hidden,))
      keys[hf + "post_feedforward_layernorm.weight"] = Target(
          ours + ("post_feedforward_norm", "scale"), (hidden,))
    mlp = ours + ("mlp",)
    keys[hf + "mlp.gate_proj.weight"] = _linear(mlp + ("gate_proj",), hidden,
                                                config.intermediate_size)
    keys[hf + "mlp.up_proj.weight"] = _linear(mlp + ("up_proj",), hidden,
                                              config.intermediate_size)
    keys[hf + "mlp.down_proj.weight"] = _linear(mlp + ("down_proj",),
                                                config.intermediate_size, hidden)
  keys["model.norm.weight"] = Target(("final_norm", "scale"), (hidden,))
  if not gemma and not config.tie_embeddings:
    keys["lm_head.weight"] = _linear(("lm_head",), hidden, config.vocab_size)
  return keys


def resolve_model(model: ModelSpec, *, dtype=jnp.float32,
                  param_dtype=jnp.float32) -> CausalLM:
  """The model to load weights into.

  Args:
    model: a :class:`CausalLM` (its parameters are overwritten in place), a name of
      ``LLM_CONFIGS`` or a config; for a name or config an abstract model is built
      (``nnx.eval_shape``: nothing is allocated until the weights are copied in).
    dtype: compute dtype of a model built here.
    param_dtype: parameter dtype of a model built here.

  Returns:
    The model.

  Raises:
    ValueError: for an unknown name or an object that is none of the above.
  """
  if isinstance(model, CausalLM):
    return model
  if isinstance(model, str):
    config = llm_config(model)
  elif isinstance(model, (LlamaConfig, Gemma3Config)):
    config = model
  else:
    raise ValueError("model must be a CausalLM, a name of LLM_CONFIGS or a LlamaConfig / "
                     f"Gemma3Config, got {type(model).__name__}.")
  model_class = MODEL_CLASSES[type(config)]
  return nnx.eval_shape(lambda: model_class(config, dtype=dtype, param_dtype=param_dtype,
                                            rngs=nnx.Rngs(0)))


def _variable(model: CausalLM, path: tuple) -> nnx.Variable:
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_hf_state_dict(model: ModelSpec, state_dict: Mapping[str, np.ndarray], *,
                       ignore_keys: Sequence[str] = (),
                       transforms: Optional[Mapping[str, Callable]] = None,
                       dtype=jnp.float32, param_dtype=jnp.float32) -> CausalLM:
  """Copies a Hugging Face state dict into a decoder language model.

  Args:
    model: the model, a name of ``LLM_CONFIGS`` or a config (see :func:`resolve_model`).
    state_dict: Hugging Face key -> array (numpy, or anything ``np.asarray`` takes), with
      linear weights in torch's ``(out, in)`` layout.
    ignore_keys: keys of ``state_dict`` to skip (e.g. a tied ``lm_head.weight`` or
      ``rotary_emb.inv_freq`` buffers).
    transforms: optional key -> function applied to that array before the shape check.
    dtype: compute dtype of a model built here.
    param_dtype: parameter dtype of a model built here (a given model keeps its own).

  Returns:
    The model with every parameter set from ``state_dict`` (cast to its dtype).

  Raises:
    ValueError: naming every missing, extra or misshapen key.
  """
  model = resolve_model(model, dtype=dtype, param_dtype=param_dtype)
  key_map = hf_key_map(model.config)
  given = set(state_dict) - set(ignore_keys)
  missing = [key for key in key_map if key not in given]
  extra = given - set(key_map)
  problems = []
  if missing:
    problems.append(f"missing keys: {_format_keys(missing)}")
  if extra:
    problems.append(f"unexpected keys: {_format_keys(extra)}")
  arrays, misshapen = {}, []
  for key, target in key_map.items():
    if key not in given:
      continue
    array = np.asarray(state_dict[key])
    if transforms and key in transforms:
      array = transforms[key](array)
    if array.shape != target.shape:
      misshapen.append(f"{key} has shape {array.shape}, expected {target.shape}")
    arrays[key] = array
  if misshapen:
    problems.append("misshapen keys: " + "; ".join(misshapen[:12])
                    + (f" (and {len(misshapen) - 12} more)" if len(misshapen) > 12 else ""))
  if problems:
    raise ValueError(f"State dict does not fit {type(model).__name__} "
                     f"({type(model.config).__name__}): " + ". ".join(problems) + ".")
  for key, target in key_map.items():
    variable = _variable(model, target.path)
    array = arrays.pop(key)
    if target.transpose:
      array = array.T
    variable.set_value(jnp.asarray(array, dtype=variable.get_value().dtype))
  leftover = [leaf for leaf in jax.tree.leaves(nnx.state(model))
              if isinstance(leaf, jax.ShapeDtypeStruct)]
  if leftover:  # Only if a model class grew parameters that hf_key_map does not know.
    raise ValueError(f"{len(leftover)} parameters of the model have no Hugging Face key.")
  return model


def load_hf_safetensors(model: ModelSpec, paths: Union[str, os.PathLike, Sequence], *,
                        ignore_keys: Sequence[str] = (), dtype=jnp.float32,
                        param_dtype=jnp.float32) -> CausalLM:
  """Loads ``model.safetensors`` file(s) of a Hugging Face checkpoint.

  Args:
    model: the model, a name of ``LLM_CONFIGS`` or a config (see :func:`resolve_model`).
    paths: one ``.safetensors`` file or several shards.
    ignore_keys: keys to skip (see :func:`load_hf_state_dict`).
    dtype: compute dtype of a model built here.
    param_dtype: parameter dtype of a model built here.

  Returns:
    The loaded model.

  Raises:
    ValueError: for a key found in two shards, or as :func:`load_hf_state_dict`.
  """
  # The flax reader keeps bfloat16 checkpoints bfloat16 (numpy has no such dtype).
  from safetensors.flax import load_file  # pylint: disable=import-outside-toplevel

  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  state_dict = {}
  for path in paths:
    shard = load_file(os.fspath(path))
    duplicates = set(shard) & set(state_dict)
    if duplicates:
      raise ValueError(f"Keys found in more than one shard ({path}): "
                       f"{_format_keys(duplicates)}.")
    state_dict.update(shard)
  return load_hf_state_dict(model, state_dict, ignore_keys=ignore_keys, dtype=dtype,
                            param_dtype=param_dtype)
