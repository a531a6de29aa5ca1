"""`--config.export`: the quantized language model as a GPTQ-format checkpoint (``gptq``)
or as one GGUF file (``gguf``, `experiments.llm_gguf`).

GPTQ: the run's quantized linear layers are written under their Hugging Face names (the
inverse of `experiments.importers.hf_safetensors.hf_key_map`) by
`quant_core.deploy.export_gptq`, with the other parameters (embedding, norms, biases, a
float `lm_head`) in float16 and a `config.json` of the architecture (LlamaForCausalLM,
Qwen2ForCausalLM or Gemma3ForCausalLM) that transformers, vLLM and GPTQModel read.
"""

import os

import numpy as np

from experiments import importers
from experiments import llm_gguf
from experiments import text_data
from experiments.importers import hf_safetensors
from experiments.models.llm import Gemma3Config
from quant_core.deploy import export_gptq

EXPORTS = (None, "gptq", "gguf")
# The export in the run's workdir: a folder (gptq) or a file (gguf).
EXPORT_DIRS = {"gptq": "gptq_checkpoint", "gguf": llm_gguf.GGUF_FILE}
# (bits, grid) pairs of the job (whose grids are packed) that GGUF blocks hold: Q4_0, Q8_0.
GGUF_GRIDS = ((4, "signed"), (4, "symmetric"), (8, "symmetric"))
# Methods whose layers are on uniform grids with codes.
EXPORT_METHODS = ("comq", "gptq", "rtn")


def check_export(config) -> None:
  """Raises ValueError, before any work, for an export the run cannot produce."""
  if config.export not in EXPORTS:
    raise ValueError(f"export must be one of {EXPORTS}, got {config.export!r}.")
  if config.export is None:
    return
  if config.method not in EXPORT_METHODS:
    raise ValueError(f"export={config.export!r} needs a post-training method "
                     f"{EXPORT_METHODS}, got method {config.method!r}.")
  block = config[config.method]
  if config.export == "gguf":
    _check_gguf_export(config, block)
    return
  if block.grid == "pow2":
    raise ValueError(f"export={config.export!r}: a pow2 grid has no GPTQ form; use "
                     f"{config.method}.grid='asymmetric' or 'symmetric'.")
  if block.scale_dtype != "float16":
    raise ValueError(f"export={config.export!r} stores float16 scales: set "
                     f"--config.{config.method}.scale_dtype=float16 so that the weights "
                     "are written exactly.")
  if block.bits not in export_gptq.BITS:
    raise ValueError(f"export={config.export!r} holds {export_gptq.BITS}-bit codes, got "
                     f"{config.method}.bits={block.bits}.")
  if block.bit_budget is not None:
    raise ValueError(f"export={config.export!r}: quantization_config holds one bit width, "
                     f"so {config.method}.bit_budget (mixed precision) must be None.")


def _check_gguf_export(config, block) -> None:
  checkpoint = config.init_checkpoint or None
  if checkpoint is not None and not checkpoint.endswith(".gguf"):
    raise ValueError("export='gguf' of a model from safetensors: its tokenizer.json is not "
                     "converted to GGUF metadata; start from the model's GGUF file "
                     f"(init_checkpoint={checkpoint!r}).")
  widths = (sorted(block.bit_choices) if block.bit_budget is not None else [block.bits])
  bad = [bits for bits in widths if (bits, block.grid) not in GGUF_GRIDS]
  if bad:
    raise ValueError(
        f"export='gguf': {config.method}.grid={block.grid!r} at bits={bad[0]} has no GGUF "
        "block format; the formats hold " + ", ".join(
            f"bits={bits} grid={grid!r}" for bits, grid in GGUF_GRIDS)
        + " (Q4_0 and Q8_0).")
  if block.scale_dtype != "float16":
    raise ValueError(f"export='gguf' stores float16 scales: set "
                     f"--config.{config.method}.scale_dtype=float16 so that the weights "
                     "are written exactly.")
  group = block.group_size if block.granularity == "group" else None
  if block.granularity == "layer" or (group is not None and group % 32):
    raise ValueError(f"export='gguf' writes blocks of 32 inputs, each with its own scale: "
                     f"{config.method}.granularity must be 'group' with group_size a "
                     f"multiple of 32 (32 is the format's own), or 'channel'; got "
                     f"granularity={block.granularity!r}, group_size={block.group_size!r}.")


def hf_module_names(model_config) -> dict:
  """Our ``/``-joined linear layer path (``layers/0/attn/q_proj``) -> Hugging Face module
  name (``model.layers.0.self_attn.q_proj``), for every linear layer of the model."""
  names = {}
  for key, target in hf_safetensors.hf_key_map(model_config).items():
    if target.transpose:
      names["/".join(str(part) for part in target.path[:-1])] = key[:-len(".weight")]
  return names


def hf_config(model_config) -> dict:
  """The Hugging Face ``config.json`` fields of a model config."""
  shape = {"vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
           "intermediate_size": model_config.intermediate_size,
           "num_hidden_layers": model_config.num_layers,
           "num_attention_heads": model_config.num_heads,
           "num_key_value_heads": model_config.num_kv_heads,
           "head_dim": model_config.head_dim, "rms_norm_eps": model_config.rms_norm_eps,
           "max_position_embeddings": model_config.max_position_embeddings}
  if isinstance(model_config, Gemma3Config):
    factor = model_config.global_rope_linear_factor
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **shape,
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": model_config.sliding_window,
            "sliding_window_pattern": model_config.sliding_window_pattern,
            "query_pre_attn_scalar": model_config.query_pre_attn_scalar,
            "rope_theta": model_config.global_rope_theta,
            "rope_local_base_freq": model_config.local_rope_theta,
            "rope_scaling": None if factor == 1.0 else {"rope_type": "linear",
                                                        "factor": factor},
            "tie_word_embeddings": True}
  scaling = model_config.rope_scaling
  qwen = model_config.qkv_bias
  return {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
          "model_type": "qwen2" if qwen else "llama", **shape, "hidden_act": "silu",
          "rope_theta": model_config.rope_theta,
          "rope_scaling": None if scaling is None else {
              "rope_type": "llama3", "factor": scaling.factor,
              "low_freq_factor": scaling.low_freq_factor,
              "high_freq_factor": scaling.high_freq_factor,
              "original_max_position_embeddings":
                  scaling.original_max_position_embeddings},
          "tie_word_embeddings": model_config.tie_embeddings,
          **({} if qwen else {"attention_bias": False, "mlp_bias": False})}


def _leaf(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def export_checkpoint(model_config, variables, packed, directory, *,
                      checkpoint_format: str = "gptq") -> dict:
  """Writes the run's model as a GPTQ-format checkpoint folder.

  Args:
    model_config: the model's :class:`LlamaConfig` or :class:`Gemma3Config`.
    variables: the quantized model's variables (``{"params": pure dict}``).
    packed: the same variables with packed kernels (the run's packed model).
    directory: the folder to write.
    checkpoint_format: ``"gptq"`` or ``"gptq_v2"``.

  Returns:
    The ``quantization_config`` written.

  Raises:
    ValueError: a linear layer of a decoder block left in float (the loaders expect
      every block projection quantized), or as
      :func:`quant_core.deploy.export_gptq.export_gptq`.
  """
  params, packed_params = variables["params"], packed["params"]
  layers, tensors, lm_head = {}, {}, False
  for key, target in hf_safetensors.hf_key_map(model_config).items():
    kernel = _leaf(packed_params, target.path)
    if target.transpose and export_gptq.packed_layers.is_packed_kernel(kernel):
      layers[key[:-len(".weight")]] = kernel
      lm_head = lm_head or key == "lm_head.weight"
      continue
    if target.transpose and key != "lm_head.weight":
      raise ValueError(f"{key} is in float; a GPTQ checkpoint holds every projection of "
                       "the decoder blocks quantized.")
    array = np.asarray(_leaf(params, target.path))
    tensors[key] = array.T if target.transpose else array
  return export_gptq.export_gptq(directory, layers, tensors,
                                 model_config=hf_config(model_config),
                                 checkpoint_format=checkpoint_format, lm_head=lm_head)


def export_run(config, model_config, variables, packed, workdir) -> str:
  """The export of `config.export` into the workdir; returns its path.

  A GGUF export copies the metadata (tokenizer included) of a GGUF source; a byte-level
  model gets the byte vocabulary.

  Raises:
    ValueError: a GGUF export of a model from safetensors (its tokenizer.json is not
      converted), or as the export functions.
  """
  path = os.path.join(workdir, EXPORT_DIRS[config.export])
  if config.export == "gptq":
    export_checkpoint(model_config, variables, packed, path)
    return path
  weights = text_data.model_source(config).weights
  source, tokenizer_fields = None, None
  if weights is None:
    tokenizer_fields = llm_gguf.byte_tokenizer_fields()
  elif weights.endswith(".gguf"):
    source = importers.open_gguf(weights)
  else:
    raise ValueError("export='gguf' of a model from safetensors: its tokenizer.json is not "
                     "converted to GGUF metadata; start from the model's GGUF file.")
  llm_gguf.export_model(path, model_config, variables, packed=packed, source=source,
                        tokenizer_fields=tokenizer_fields, name=config.model.name)
  return path
