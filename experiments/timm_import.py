"""Loads timm ViT / DeiT / Swin weights into experiments.models variables.

Reads a timm state dict from `.safetensors` (the format of timm's Hugging Face hub weights,
read with safetensors' numpy API: no torch needed), `.npz`, or `.pth`/`.pt`/`.bin` through torch
when it is installed, and converts it key by key (layouts as of timm 1.0; Swin in the >= 0.9
layout, see experiments.models.swin):
  `<m>.attn.qkv.weight` (3 * heads * head_dim, width) -> `<m>/attn/{query,key,value}/kernel`
      (width, heads, head_dim), rows ordered (q|k|v, head, head_dim) as timm reshapes them
  `<m>.attn.qkv.bias` (3 * heads * head_dim,) -> `<m>/attn/{query,key,value}/bias`
      (heads, head_dim)
  `<m>.attn.proj.weight` (width, heads * head_dim) -> `<m>/attn/out/kernel` (heads, head_dim, width)
  linear weight (out, in) -> kernel (in, out); conv weight (O, I, H, W) -> kernel (H, W, I, O)
  LayerNorm weight -> scale; biases, cls_token, dist_token, pos_embed and Swin's
  relative_position_bias_table as they are
  Swin buffers: `relative_position_index` is checked against the model's, `attn_mask` (derived
  from the window shift, which the model recomputes) is accepted; neither is a parameter.
Module names match with "." before an index replaced by "_" (`blocks.3` is `blocks_3`).
Every model parameter must be found with the right shape and every tensor of the state dict
(Swin buffers aside) must be used; otherwise a ValueError names the key, and nothing is returned.

To convert on a machine with timm:  from safetensors.torch import save_file;
save_file(timm.create_model("deit_small_patch16_224", pretrained=True).state_dict(),
"deit_small.safetensors").
"""

import os
import re

import jax
import numpy as np

from experiments.models import swin
from quant_core import paths

TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
ATTENTION_PROJECTIONS = ("query", "key", "value")
LEAF_TO_TIMM = {"kernel": "weight", "scale": "weight"}


def load_state_dict(path):
  """Reads a timm state dict.

  Args:
    path: a `.safetensors`, `.npz`, or (with torch installed) `.pth`/`.pt`/`.bin` file.
  Returns:
    {timm key: numpy array}.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
  extension = os.path.splitext(path)[1]
  if extension == ".safetensors":
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    return safetensors_numpy.load_file(path)
  if extension == ".npz":
    with np.load(path) as archive:
      return {key: archive[key] for key in archive.files}
  if extension in TORCH_EXTENSIONS:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"Reading a {extension} checkpoint ({path}) needs torch, which is not installed; "
          "use the .safetensors file from the Hugging Face hub, or convert to .safetensors or "
          ".npz on a machine with torch (see experiments/timm_import.py).") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints (DeiT's own releases among them) nest the weights under "model".
    state_dict = state_dict.get("model", state_dict)
    return {key: value.numpy() for key, value in state_dict.items()}
  raise ValueError(f"Unsupported checkpoint format {extension!r} for {path}; expected "
                   f".safetensors, .npz or (with torch) {', '.join(TORCH_EXTENSIONS)}.")


def timm_key(path):
  """timm key of the flax parameter at `path` (a tuple of names under "params").

  ("blocks_0", "attn", "key", "kernel") -> "blocks.0.attn.qkv.weight";
  ("layers_1", "downsample", "norm", "scale") -> "layers.1.downsample.norm.weight".
  """
  *modules, leaf = path
  modules = [re.sub(r"_(\d+)$", r".\1", module) for module in modules]
  if modules[-2:-1] == ["attn"]:
    if modules[-1] in ATTENTION_PROJECTIONS:
      modules[-1] = "qkv"
    elif modules[-1] == "out":
      modules[-1] = "proj"
  return ".".join(modules + [LEAF_TO_TIMM.get(leaf, leaf)])


def timm_layout(path, shape):
  """How the flax parameter at `path` with `shape` is stored in timm.

  Returns:
    (timm shape, function mapping the timm array to the flax layout).
  """
  module = path[-2] if len(path) > 1 else None
  leaf = path[-1]
  if len(path) > 2 and path[-3] == "attn" and module in ATTENTION_PROJECTIONS:
    part = ATTENTION_PROJECTIONS.index(module)
    if leaf == "kernel":
      width, heads, head_dim = shape
      rows = heads * head_dim
      return (3 * rows, width), lambda w: (
          w[part * rows:(part + 1) * rows].reshape(heads, head_dim, width).transpose(2, 0, 1))
    heads, head_dim = shape
    rows = heads * head_dim
    return (3 * rows,), lambda b: b[part * rows:(part + 1) * rows].reshape(heads, head_dim)
  if len(path) > 2 and path[-3] == "attn" and module == "out" and leaf == "kernel":
    heads, head_dim, width = shape
    return (width, heads * head_dim), lambda w: w.T.reshape(heads, head_dim, width)
  if leaf == "kernel" and len(shape) == 4:
    height, width, in_channels, out_channels = shape
    return (out_channels, in_channels, height, width), lambda w: w.transpose(2, 3, 1, 0)
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1], lambda w: w.T
  return tuple(shape), lambda value: value


def check_buffer(key, value, state_dict, used):
  """Validates a Swin buffer `key`, or raises the unexpected-key error for it.

  Args:
    key: a state-dict key not mapped to any parameter.
    value: its array.
    state_dict: the whole state dict.
    used: keys mapped to parameters.
  """
  prefix, _, name = key.rpartition(".")
  if name == "relative_position_index" and f"{prefix}.relative_position_bias_table" in used:
    rows = state_dict[f"{prefix}.relative_position_bias_table"].shape[0]
    window = (round(rows**0.5) + 1) // 2
    if not np.array_equal(value, swin.relative_position_index(window)):
      raise ValueError(f"{key!r} differs from the relative position index of a {window}x{window} "
                       "window that the model uses to read the bias table.")
    return
  if name == "attn_mask" and f"{prefix}.norm1.weight" in used:
    return
  raise ValueError(f"Unexpected key {key!r} in the state dict (shape {np.shape(value)}).")


def convert_state_dict(state_dict, variables):
  """Returns `variables` ({"params": ...}) filled from a timm state dict.

  Args:
    state_dict: {timm key: array}; not modified.
    variables: the model's variables (arrays or ShapeDtypeStructs) giving names, shapes and
      dtypes.
  Returns:
    New variables with numpy arrays, structured like `variables`.
  Raises:
    ValueError naming the key that is missing, unexpected or of the wrong shape.
  """
  if set(variables) != {"params"}:
    raise ValueError(f"timm transformers have only params; got collections {sorted(variables)}.")
  used = set()

  def convert(key_path, template):
    path = paths.keys_of(key_path)
    key = timm_key(path)
    if key not in state_dict:
      raise ValueError(f"Missing key {key!r} in the state dict (for params/{'/'.join(path)}).")
    value = np.asarray(state_dict[key])
    expected_shape, to_flax = timm_layout(path, template.shape)
    if value.shape != expected_shape:
      raise ValueError(f"Wrong shape for {key!r}: {value.shape}, the model expects "
                       f"{expected_shape} (for params/{'/'.join(path)}, {template.shape}).")
    used.add(key)
    return to_flax(value).astype(template.dtype)

  params = jax.tree_util.tree_map_with_path(convert, variables["params"])
  for key in sorted(set(state_dict) - used):
    check_buffer(key, state_dict[key], state_dict, used)
  return {"params": params}


def import_timm(source, variables):
  """Loads timm weights into the structure of `variables`.

  Args:
    source: a checkpoint path (see load_state_dict) or a {timm key: array} state dict.
    variables: the model's variables, e.g. from jax.eval_shape of `model.init`.
  Returns:
    New variables holding the converted weights.
  """
  state_dict = load_state_dict(source) if isinstance(source, (str, os.PathLike)) else source
  return convert_state_dict(state_dict, variables)
