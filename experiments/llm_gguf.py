"""A quantized decoder language model as one GGUF file, the inverse of
`experiments.importers.gguf`: llama.cpp's tensor names and architecture metadata, the
changes llama.cpp's converter makes, and the tokenizer.

* Architectures: ``llama`` (Llama, SmolLM2), ``qwen2`` (q/k/v biases) and ``gemma3``.
* Llama's q/k projections get llama.cpp's per-head row permutation (its "normal" RoPE
  pairs); a quantized matrix's rows move with their blocks, so this stays lossless.
  Gemma 3's norms are written as ``1 + weight`` (llama.cpp multiplies by the weight).
  A Llama 3 RoPE scaling is written as the ``rope_freqs.weight`` factors.
* Quantized projections become Q4_0, Q4_1 or Q8_0 blocks
  (`quant_core.deploy.export_gguf`); every other tensor (embedding, norms, biases, a
  projection left in float) is float (F32 by default; the names of float projections
  are returned), except that a tensor equal to a block-quantized one of a GGUF source
  (an embedding table left alone) keeps the source's blocks.
* Metadata: a GGUF source's fields (its tokenizer, names, chat template, ...) are copied
  and the architecture fields rewritten from the config; a byte-level model gets a
  256-token byte vocabulary (``tokenizer.ggml.model = "gpt2"`` without merges: each
  byte is its own token). A model from safetensors needs its tokenizer fields passed.
"""

import numpy as np

from experiments.importers import gguf as gguf_import
from experiments.importers import hf_safetensors
from experiments.models.llm import Gemma3Config
from experiments.models.llm import RopeSpec
from quant_core.deploy import export_gguf
from quant_core.deploy import packed_layers

Field = export_gguf.Field
GGUF_FILE = "model.gguf"


def architecture(model_config) -> str:
  """llama.cpp's architecture name of a model config."""
  if isinstance(model_config, Gemma3Config):
    return "gemma3"
  return "qwen2" if model_config.qkv_bias else "llama"


def model_fields(model_config) -> dict:
  """The ``{arch}.*`` metadata of a model config (what
  :func:`experiments.importers.gguf_hyperparameters` reads back)."""
  arch = architecture(model_config)
  u32 = lambda value: Field(int(value), "UINT32")
  f32 = lambda value: Field(float(value), "FLOAT32")
  fields = {
      "context_length": u32(model_config.max_position_embeddings),
      "embedding_length": u32(model_config.hidden_size),
      "block_count": u32(model_config.num_layers),
      "feed_forward_length": u32(model_config.intermediate_size),
      "attention.head_count": u32(model_config.num_heads),
      "attention.head_count_kv": u32(model_config.num_kv_heads),
      "attention.key_length": u32(model_config.head_dim),
      "attention.value_length": u32(model_config.head_dim),
      "attention.layer_norm_rms_epsilon": f32(model_config.rms_norm_eps),
      "rope.dimension_count": u32(model_config.head_dim),
      "vocab_size": u32(model_config.vocab_size),
  }
  if arch == "gemma3":
    fields.update({
        "rope.freq_base": f32(model_config.global_rope_theta),
        "rope.freq_base_swa": f32(model_config.local_rope_theta),
        "attention.sliding_window": u32(model_config.sliding_window),
        "attention.sliding_window_pattern": u32(model_config.sliding_window_pattern)})
    if model_config.global_rope_linear_factor != 1.0:
      fields["rope.scaling.type"] = Field("linear", "STRING")
      fields["rope.scaling.factor"] = f32(model_config.global_rope_linear_factor)
  else:
    fields["rope.freq_base"] = f32(model_config.rope_theta)
  return {f"{arch}.{key}": value for key, value in fields.items()}


def _byte_to_unicode() -> list:
  """GPT-2's byte-level alphabet: the character standing for each byte 0..255
  (printable Latin-1 bytes stand for themselves, the others for 256 + n)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = [], 0
  for byte in range(256):
    if byte in printable:
      chars.append(chr(byte))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def byte_tokenizer_fields() -> dict:
  """Tokenizer metadata of the byte-level models: token ``i`` is byte ``i``."""
  return {"tokenizer.ggml.model": Field("gpt2", "STRING"),
          "tokenizer.ggml.pre": Field("default", "STRING"),
          "tokenizer.ggml.tokens": Field(_byte_to_unicode(), "ARRAY", "STRING"),
          "tokenizer.ggml.token_type": Field([1] * 256, "ARRAY", "INT32")}


def _leaf(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def _q_k_heads(model_config, hf_key: str):
  if ".q_proj." in hf_key:
    return model_config.num_heads
  if ".k_proj." in hf_key:
    return model_config.num_kv_heads
  return None


def quantized_layers(model_config, *, packed=None, result=None) -> dict:
  """Our ``/``-joined linear layer path -> quantized layer, from packed variables or a
  :class:`comq_jax.ModelQuantization` (whose reports hold the codes; needed for the
  ``"offset"`` grid, which has no packed form)."""
  if (packed is None) == (result is None):
    raise ValueError("give exactly one of packed (packed variables) and result (a "
                     "comq_jax.ModelQuantization).")
  layers = {}
  if result is not None:
    for report in result.layers:
      if report.quantization is None:
        raise ValueError(f"{report.path}: the report holds no codes (rebuilt from a "
                         "record); export the result quantize_model returned.")
      layers[report.path] = report.quantization
    return layers
  for target in hf_safetensors.hf_key_map(model_config).values():
    if target.transpose:
      kernel = _leaf(packed["params"], target.path)
      if packed_layers.is_packed_kernel(kernel):
        layers["/".join(str(part) for part in target.path[:-1])] = kernel
  return layers


def model_tensors(model_config, variables, layers, *, tensor_type=None):
  """The GGUF tensors of a model's variables.

  Args:
    model_config: a :class:`LlamaConfig` or :class:`Gemma3Config`.
    variables: ``{"params": ...}`` of the model (the de-quantized weights).
    layers: our linear layer path -> quantized layer (:func:`quantized_layers`), written
      as blocks (:func:`quant_core.deploy.export_gguf.layer_tensor`); the other
      projections are written in float.
    tensor_type: forces one block type for every quantized layer (None: each grid's own).

  Returns:
    ``(tensors, float_projections)``: GGUF name -> tensor, and the Hugging Face names of
    the projections written in float.
  """
  arch = architecture(model_config)
  params = variables["params"]
  tensors, float_projections = {}, []
  for hf_key, target in hf_safetensors.hf_key_map(model_config).items():
    name = gguf_import.gguf_name(arch, hf_key)
    layer = layers.get("/".join(str(part) for part in target.path[:-1]))
    if target.transpose and layer is not None:
      tensor = export_gguf.layer_tensor(layer, tensor_type=tensor_type, name=hf_key)
    else:
      tensor = np.asarray(_leaf(params, target.path), np.float32)
      tensor = tensor.T if target.transpose else tensor
      if target.transpose:
        float_projections.append(hf_key)
    heads = _q_k_heads(model_config, hf_key) if arch == "llama" else None
    if heads is not None and isinstance(tensor, export_gguf.GGUFTensor):
      tensor = tensor.permute_rows(gguf_import.permute_rows(np.arange(tensor.shape[0]),
                                                            heads))
    elif heads is not None:
      tensor = gguf_import.permute_rows(tensor, heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
      tensor = tensor + np.float32(1.0)
    tensors[name] = tensor
  rope_scaling = getattr(model_config, "rope_scaling", None)
  if rope_scaling is not None:
    plain = RopeSpec(model_config.rope_theta).inverse_frequencies(model_config.head_dim)
    tensors["rope_freqs.weight"] = (
        plain / model_config.rope.inverse_frequencies(model_config.head_dim)
    ).astype(np.float32)
  return tensors, float_projections


def reuse_source_tensors(tensors: dict, source) -> dict:
  """``tensors`` with every float tensor that equals a block-quantized tensor of the same
  name in ``source`` (a ``gguf.GGUFReader``) replaced by the source's blocks: a layer the
  run left alone (e.g. the embedding table) keeps its original type and size, exactly."""
  by_name = {tensor.name: tensor for tensor in source.tensors}
  out = dict(tensors)
  for name, tensor in tensors.items():
    original = by_name.get(name)
    if (isinstance(tensor, export_gguf.GGUFTensor) or original is None
        or original.tensor_type.name in ("F32", "F16", "BF16")):
      continue
    values = gguf_import.dequantize_tensor(original)
    if values.shape == np.shape(tensor) and np.array_equal(values, tensor):
      out[name] = export_gguf.GGUFTensor(original.tensor_type.name,
                                         np.asarray(original.data), values.shape)
  return out


def export_model(path, model_config, variables, *, packed=None, result=None, source=None,
                 tokenizer_fields=None, name=None, tensor_type=None,
                 float_type="F32") -> dict:
  """Writes a decoder language model as one GGUF file (see the module docstring).

  Args:
    path: the ``.gguf`` file.
    model_config: the model's :class:`LlamaConfig` or :class:`Gemma3Config`.
    variables: the model's (de-quantized) variables, ``{"params": pure dict}``.
    packed: the same variables with packed kernels; or
    result: the :class:`comq_jax.ModelQuantization` of the variables (its codes); give
      one of the two.
    source: a ``gguf.GGUFReader`` of the file the model came from: its metadata
      (tokenizer included) is copied, and the tensors the run did not change keep
      their source type (:func:`reuse_source_tensors`).
    tokenizer_fields: ``tokenizer.ggml.*`` :class:`Field` s (e.g.
      :func:`byte_tokenizer_fields`), written over the source's.
    name: ``general.name``.
    tensor_type: forces one block type (``"Q4_0"``, ``"Q4_1"``, ``"Q8_0"``).
    float_type: ``"F32"`` (exact) or ``"F16"`` for the float matrices.

  Returns:
    ``{"tensor_types": name -> type, "float_projections": [...]}``.

  Raises:
    ValueError: no tokenizer (neither a source nor ``tokenizer_fields``), both or
      neither of ``packed`` and ``result``, or as
      :func:`quant_core.deploy.export_gguf.layer_tensor` for a quantized layer the
      block formats cannot hold.
  """
  metadata = {} if source is None else export_gguf.reader_fields(source)
  metadata.update(model_fields(model_config))
  metadata.update(tokenizer_fields or {})
  if "tokenizer.ggml.tokens" not in metadata:
    raise ValueError("no tokenizer: give a GGUF source or tokenizer_fields (a file "
                     "without one is not a complete model for llama.cpp).")
  if name is not None:
    metadata["general.name"] = Field(name, "STRING")
  layers = quantized_layers(model_config, packed=packed, result=result)
  tensors, float_projections = model_tensors(model_config, variables, layers,
                                             tensor_type=tensor_type)
  if source is not None:
    tensors = reuse_source_tensors(tensors, source)
  types = export_gguf.export_gguf(path, architecture(model_config), tensors,
                                  metadata=metadata, float_type=float_type)
  return {"tensor_types": types, "float_projections": float_projections}
