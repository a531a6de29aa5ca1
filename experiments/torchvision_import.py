"""Loads torchvision ResNet weights into experiments.models.ResNet variables.

Reads a state dict from `.pth`/`.pt` (through torch, when installed), `.npz` or
`.safetensors` (numpy API, no torch needed) and converts it:
  conv weight (O, I, H, W)  -> kernel (H, W, I, O)
  linear weight (out, in)   -> kernel (in, out)
  BN weight / bias / running_mean / running_var -> scale / bias / mean / var
  num_batches_tracked       -> ignored
Every model variable must be found with the right shape and every torchvision tensor must
be used; otherwise a ValueError names the offending key.

To convert on a machine with torch:  np.savez("resnet18.npz", **{k: v.numpy() for k, v in
torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict().items()}).
"""

import os
import re

import jax
import numpy as np
from quant_core import paths

LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def load_state_dict(path):
  """Returns {torchvision key: numpy array} read from a .pth/.pt, .npz or .safetensors file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
  extension = os.path.splitext(path)[1]
  if extension == ".npz":
    with np.load(path) as archive:
      return {key: archive[key] for key in archive.files}
  if extension == ".safetensors":
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    return safetensors_numpy.load_file(path)
  if extension in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"Reading {path} needs torch; convert it to .npz or .safetensors on a machine "
          "with torch (see experiments/torchvision_import.py).") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.numpy() for key, value in state_dict.items()}
  raise ValueError(f"Unsupported checkpoint format {extension!r} for {path}; "
                   "expected .pth, .pt, .npz or .safetensors.")


def torch_key(collection, path):
  """torchvision key of the flax variable at `path` in `collection`.

  ("params", ("layer2_0", "downsample_0", "kernel")) -> "layer2.0.downsample.0.weight".
  """
  *modules, leaf = path
  if (collection, leaf) not in LEAF_TO_TORCH:
    raise ValueError(f"No torchvision counterpart for {collection}/{'/'.join(path)}.")
  modules = [re.sub(r"_(\d+)$", r".\1", module) for module in modules]
  return ".".join(modules + [LEAF_TO_TORCH[(collection, leaf)]])


def to_flax_layout(array):
  """OIHW conv weights -> HWIO; (out, in) linear weights -> (in, out); others as they are."""
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return array.T
  return array


def convert_state_dict(state_dict, variables):
  """Returns `variables` ({"params", "batch_stats"}) filled from a torchvision state dict.

  Args:
    state_dict: {torchvision key: array}.
    variables: the model's variables (arrays or ShapeDtypeStructs) giving names, shapes
      and dtypes.
  Raises:
    ValueError naming the key that is missing, unexpected or of the wrong shape.
  """
  used = set()

  def convert(collection, key_path, template):
    path = paths.keys_of(key_path)
    key = torch_key(collection, path)
    if key not in state_dict:
      raise ValueError(f"Missing key {key!r} in the state dict (for {collection}/"
                       f"{'/'.join(path)}).")
    value = to_flax_layout(np.asarray(state_dict[key]))
    if value.shape != template.shape:
      raise ValueError(f"Wrong shape for {key!r}: {np.shape(state_dict[key])} converts "
                       f"to {value.shape}, the model expects {template.shape}.")
    used.add(key)
    return value.astype(template.dtype)

  converted = {
      collection: jax.tree_util.tree_map_with_path(
          lambda key_path, template, c=collection: convert(c, key_path, template),
          variables[collection])
      for collection in variables}
  unexpected = sorted(key for key in state_dict
                      if key not in used and not key.endswith("num_batches_tracked"))
  if unexpected:
    raise ValueError(f"Unexpected key {unexpected[0]!r} in the state dict "
                     f"({len(unexpected)} unused: {unexpected[:5]}).")
  return converted


def import_torchvision(path, variables):
  """Loads the torchvision checkpoint at `path` into the structure of `variables`."""
  return convert_state_dict(load_state_dict(path), variables)
