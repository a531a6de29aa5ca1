"""GGUF files (llama.cpp's format) into the decoder language models of
experiments.models.llm, through the ``gguf`` package.

Every tensor type ``gguf.quants.dequantize`` knows (F32, F16, BF16, Q4_0 ... Q8_0, the
K-quants, the IQ types, ...) is dequantized to float32. The tensors are renamed from
llama.cpp's names (``token_embd.weight``, ``blk.N.attn_q.weight``, ..., ``output_norm.weight``)
to Hugging Face's, the changes llama.cpp's converter made are undone, and the result goes
through :func:`experiments.importers.hf_safetensors.load_hf_state_dict`:

* ``llama`` (Llama, SmolLM2): the converter permutes the rows of ``attn_q`` / ``attn_k``
  within each head (interleaved RoPE pairs for llama.cpp's "normal" RoPE); the inverse
  permutation restores Hugging Face's rotate-half layout.
* ``qwen2`` and ``gemma3`` use llama.cpp's NEOX RoPE (rotate-half, as ours): not permuted.
* ``gemma3``: the converter adds 1 to every ``*norm.weight`` (llama.cpp multiplies by the
  weight itself); 1 is subtracted to get back Gemma's ``1 + weight`` convention.

Hyperparameters come from the metadata (``{arch}.block_count``, ``embedding_length``, ...):
:func:`gguf_config` builds a config from them, or checks them against a named config.
"""

import dataclasses
import os
import re
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from experiments.importers.hf_safetensors import load_hf_state_dict
from experiments.models.llm import CausalLM
from experiments.models.llm import Gemma3Config
from experiments.models.llm import LlamaConfig
from experiments.models.llm import RopeSpec
from experiments.models.llm import llm_config

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen2")

# llama.cpp name (after "blk.N.") -> Hugging Face name (after "model.layers.N."), per family.
_COMMON_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAMES = {
    "llama": {**_COMMON_BLOCK_NAMES, "ffn_norm.weight": "post_attention_layernorm.weight"},
    "gemma3": {
        **_COMMON_BLOCK_NAMES,
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}
_BLOCK_NAMES["qwen2"] = _BLOCK_NAMES["llama"]
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
# Tensors llama.cpp adds that have no Hugging Face counterpart; checked, not loaded.
_DERIVED_TENSORS = ("rope_freqs.weight",)


def open_gguf(path: Union[str, os.PathLike]):
  """A ``gguf.GGUFReader`` of the file (memory-mapped: tensors are read when used).

  Raises:
    FileNotFoundError: if there is no such file.
  """
  import gguf  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise FileNotFoundError(f"No GGUF file at {os.fspath(path)!r}.")
  return gguf.GGUFReader(path)


_MISSING = object()


def metadata_value(reader, key: str, default=_MISSING):
  """The value of metadata field ``key`` (a str, number, bool or list). A float32 scalar
  is returned as the shortest decimal that rounds to it (1e-6, not 9.99999997e-07).

  Raises:
    KeyError: naming the field, if it is absent and there is no default.
  """
  import gguf  # pylint: disable=import-outside-toplevel

  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise KeyError(f"GGUF metadata has no field {key!r}.")
    return default
  value = field.contents()
  if field.types == [gguf.GGUFValueType.FLOAT32]:
    value = float(str(np.float32(value)))
  return value


def gguf_architecture(reader) -> str:
  """``general.architecture``, checked to be supported.

  Raises:
    ValueError: naming the architecture and the supported ones.
  """
  architecture = metadata_value(reader, "general.architecture")
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"Unsupported GGUF architecture {architecture!r}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  return architecture


def _tensor_names(reader) -> set:
  return {tensor.name for tensor in reader.tensors}


def _tensor(reader, name: str):
  for tensor in reader.tensors:
    if tensor.name == name:
      return tensor
  raise ValueError(f"The GGUF file has no tensor {name!r}.")


def gguf_hyperparameters(reader) -> dict:
  """The config fields the GGUF file determines, by name (of :class:`LlamaConfig` or
  :class:`Gemma3Config`): only what its metadata and tensors say, no defaults filled in
  for what they do not."""
  architecture = gguf_architecture(reader)
  names = _tensor_names(reader)
  value = lambda key, *default: metadata_value(reader, f"{architecture}.{key}", *default)
  embed = _tensor(reader, "token_embd.weight")
  heads = value("attention.head_count")
  hidden = value("embedding_length")
  fields = dict(
      vocab_size=int(embed.shape[1]), hidden_size=hidden,
      intermediate_size=value("feed_forward_length"), num_layers=value("block_count"),
      num_heads=heads, num_kv_heads=value("attention.head_count_kv", heads),
      head_dim=value("attention.key_length", hidden // heads),
      rms_norm_eps=value("attention.layer_norm_rms_epsilon"),
      max_position_embeddings=value("context_length"))
  rope_base = value("rope.freq_base", None)
  if architecture == "gemma3":
    fields["sliding_window"] = value("attention.sliding_window")
    if rope_base is not None:
      fields["global_rope_theta"] = rope_base
    for key, field in [("rope.freq_base_swa", "local_rope_theta"),
                       ("attention.sliding_window_pattern", "sliding_window_pattern"),
                       ("rope.scaling.factor", "global_rope_linear_factor")]:
      if value(key, None) is not None:
        fields[field] = value(key)
  else:
    if rope_base is not None:
      fields["rope_theta"] = rope_base
    fields["qkv_bias"] = "blk.0.attn_q.bias" in names
    fields["tie_embeddings"] = "output.weight" not in names
  return fields


def _close(a, b) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return bool(np.isclose(float(a), float(b), rtol=1e-5, atol=0.0))
  return a == b


def gguf_config(reader, name: Optional[str] = None):
  """The model config of a GGUF file.

  Args:
    reader: from :func:`open_gguf`.
    name: optional name in ``LLM_CONFIGS``: its config is returned once every
      hyperparameter in the file is checked to agree with it (needed for what GGUF does not
      store, such as Llama 3's RoPE scaling).

  Returns:
    A :class:`LlamaConfig` or :class:`Gemma3Config`. Without ``name``, the defaults of those
    classes fill what the file does not say; a Gemma 3 file's query scaling is its key
    length (llama.cpp's assumption too).

  Raises:
    ValueError: for an unsupported architecture, a named config of the other family, a
      hyperparameter that differs from the named config (naming each), or a Llama 3
      RoPE-scaled file (``rope_freqs.weight``) without a name.
  """
  architecture = gguf_architecture(reader)
  fields = gguf_hyperparameters(reader)
  config_class = Gemma3Config if architecture == "gemma3" else LlamaConfig
  if name is not None:
    config = llm_config(name)
    if not isinstance(config, config_class):
      raise ValueError(f"The GGUF file is a {architecture!r} model ({config_class.__name__}) "
                       f"but {name!r} is a {type(config).__name__}.")
    mismatches = [f"{key}: file {value!r}, config {getattr(config, key)!r}"
                  for key, value in fields.items() if not _close(value, getattr(config, key))]
    if mismatches:
      raise ValueError(f"GGUF hyperparameters differ from config {name!r}: "
                       + "; ".join(mismatches) + ".")
  else:
    if "rope_freqs.weight" in _tensor_names(reader):
      raise ValueError("The GGUF file has Llama 3 RoPE scaling (rope_freqs.weight), whose "
                       "parameters GGUF does not store: pass the name of its config.")
    if config_class is Gemma3Config:
      fields.setdefault("query_pre_attn_scalar", float(fields["head_dim"]))
    known = {field.name for field in dataclasses.fields(config_class)}
    config = config_class(**{key: value for key, value in fields.items() if key in known})
  if "rope_freqs.weight" in _tensor_names(reader):
    _check_rope_factors(reader, config)
  return config


def _check_rope_factors(reader, config) -> None:
  factors = dequantize_tensor(_tensor(reader, "rope_freqs.weight"))
  if not isinstance(config, LlamaConfig) or config.rope_scaling is None:
    raise ValueError("The GGUF file has RoPE frequency factors (rope_freqs.weight) but the "
                     "config has no rope_scaling.")
  plain = RopeSpec(config.rope_theta).inverse_frequencies(config.head_dim)
  ours = plain / config.rope.inverse_frequencies(config.head_dim)
  if factors.shape != ours.shape or not np.allclose(factors, ours, rtol=1e-3):
    raise ValueError("The GGUF file's RoPE frequency factors (rope_freqs.weight) differ from "
                     "the config's Llama 3 RoPE scaling.")


def dequantize_tensor(tensor) -> np.ndarray:
  """A ``gguf.ReaderTensor`` as a float32 numpy array in numpy (row-major) order: GGUF
  lists dimensions fastest-first, so a ``[in, out]`` GGUF matrix is ``(out, in)`` here.

  Raises:
    ValueError: naming the tensor and its type, if ``gguf`` cannot dequantize it.
  """
  import gguf  # pylint: disable=import-outside-toplevel

  try:
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as error:
    raise ValueError(f"Cannot dequantize GGUF tensor {tensor.name!r} of type "
                     f"{tensor.tensor_type.name}: {error}") from error
  shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
  return np.asarray(array, np.float32).reshape(shape)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head q/k row permutation (see :func:`permute_rows`); works on
  weights ``(rows, in)`` and on biases.

  Args:
    weight: the GGUF ``attn_q`` / ``attn_k`` weight or bias, rows first.
    heads: query heads for ``attn_q``, key/value heads for ``attn_k``.

  Returns:
    The rows in Hugging Face's order.
  """
  rows = weight.shape[0]
  return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation for Llama: within each head, the Hugging Face rows
  ``[a_0 .. a_{n-1}, b_0 .. b_{n-1}]`` (the two rotate-half halves) become
  ``[a_0, b_0, a_1, b_1, ...]``.

  Args:
    weight: a Hugging Face q_proj / k_proj weight or bias, rows first.
    heads: query heads for q_proj, key/value heads for k_proj.

  Returns:
    The rows in llama.cpp's order.
  """
  rows = weight.shape[0]
  return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def hf_name(architecture: str, gguf_name: str) -> Optional[str]:
  """The Hugging Face key of llama.cpp tensor ``gguf_name`` (None if unknown)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  match = _BLOCK_PATTERN.fullmatch(gguf_name)
  if match and match.group(2) in _BLOCK_NAMES[architecture]:
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[architecture][match.group(2)]}"
  return None


def gguf_name(architecture: str, hf_key: str) -> str:
  """llama.cpp's tensor name of Hugging Face key ``hf_key`` (the inverse of
  :func:`hf_name`).

  Raises:
    ValueError: for an unsupported architecture or a key with no llama.cpp name.
  """
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"Unsupported GGUF architecture {architecture!r}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  for name, key in _GLOBAL_NAMES.items():
    if key == hf_key:
      return name
  match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_key)
  if match:
    for name, key in _BLOCK_NAMES[architecture].items():
      if key == match.group(2):
        return f"blk.{match.group(1)}.{name}"
  raise ValueError(f"{hf_key!r} has no llama.cpp tensor name in a {architecture!r} model.")


def gguf_state_dict(reader, config) -> dict:
  """The GGUF file's tensors as a Hugging Face state dict of float32 numpy arrays.

  Args:
    reader: from :func:`open_gguf`.
    config: the model's config (:func:`gguf_config`), for the head counts of the q/k
      permutation.

  Returns:
    Hugging Face key -> array, in torch's ``(out, in)`` layout.

  Raises:
    ValueError: naming tensors with no Hugging Face counterpart, or that cannot be
      dequantized.
  """
  architecture = gguf_architecture(reader)
  state_dict, unknown = {}, []
  for tensor in reader.tensors:
    if tensor.name in _DERIVED_TENSORS:
      continue
    key = hf_name(architecture, tensor.name)
    if key is None:
      unknown.append(tensor.name)
      continue
    array = dequantize_tensor(tensor)
    if architecture == "llama" and ".attn_q." in tensor.name:
      array = unpermute_rows(array, config.num_heads)
    elif architecture == "llama" and ".attn_k." in tensor.name:
      array = unpermute_rows(array, config.num_kv_heads)
    elif architecture == "gemma3" and tensor.name.endswith("norm.weight"):
      array = array - np.float32(1.0)
    state_dict[key] = array
  if unknown:
    raise ValueError(f"GGUF tensors with no counterpart in a {architecture!r} model: "
                     f"{', '.join(sorted(unknown)[:12])}.")
  return state_dict


def load_gguf(path: Union[str, os.PathLike], name: Optional[str] = None, *,
              dtype=jnp.float32, param_dtype=jnp.float32) -> CausalLM:
  """Builds a decoder language model from a GGUF file, weights dequantized.

  Args:
    path: the ``.gguf`` file.
    name: optional name in ``LLM_CONFIGS`` to check the file against and build (see
      :func:`gguf_config`); else the config comes from the file's metadata.
    dtype: the model's compute dtype.
    param_dtype: the model's parameter dtype.

  Returns:
    A :class:`Llama` or :class:`Gemma3` with the file's weights.

  Raises:
    ValueError: for an unsupported architecture, hyperparameters that differ from the
      named config, or tensors that are missing, extra, misshapen or not dequantizable.
  """
  reader = open_gguf(path)
  config = gguf_config(reader, name)
  return load_hf_state_dict(config, gguf_state_dict(reader, config), dtype=dtype,
                            param_dtype=param_dtype)
