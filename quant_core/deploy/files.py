"""A packed model file: codes and grid parameters, no float copy of the kernels.

Format: one safetensors file (``safetensors`` is imported inside the
functions; it comes with the ``experiments`` extra, ``pip install
.[experiments]``). Tensors are named by the ``/``-joined path of their leaf
in the variables, plus a ``.field`` suffix for packed kernels. The header's
``__metadata__`` holds:

* ``format``: ``"quant_core.packed"``;
* ``format_version``: :data:`FORMAT_VERSION` (``"2"``); a file of another
  version is refused;
* ``leaves``: JSON, a list with one entry per leaf of the variables, in
  tree order:

  - ``{"path": [keys], "kind": "float"}``: an unquantized leaf (bias, norm
    scale, ``batch_stats``), stored as the tensor ``path`` in its own dtype;
  - a packed kernel: ``{"path", "kind": "pow2" | "uniform", "form":
    "layer" | "kernel", "bits", "grid": "pow2" | "asymmetric" |
    "symmetric", "k_tile", "layout", "group_size", "shape", "kernel_shape",
    "groups", "kernel_perm", "dtype"}`` with the tensors ``path.codes`` (uint8 codes), ``path.n1``
    (int32, power of two) or ``path.scale`` (float32) and, asymmetric only,
    ``path.zero_point`` (int32).

    ``form`` ``"layer"`` is a :class:`~quant_core.deploy.packed_layers.PackedLayer`:
    the ``groups`` matrices of the layer's 2-D view, each of logical
    ``shape`` ``(d_in, d_out)``, every tensor with a leading ``groups`` axis;
    ``kernel_perm`` (null for a convolution) and ``dtype`` give the float
    kernel back (:func:`~quant_core.deploy.packed_layers.unpack`).
    ``form`` ``"kernel"`` is a packed weight of logical ``shape`` equal to
    ``kernel_shape`` (leading axes flattened into rows, ``groups`` 1, no
    leading axis). ``layout`` names the code layout of
    :mod:`quant_core.deploy.codes`: ``"nibbles_split_halves"`` (two codes a
    byte at ``bits <= 4``: in each block of ``k_tile`` rows, byte row ``r``
    holds row ``r`` in its low nibble and row ``r + k_tile/2`` in its high
    one) or ``"bytes"`` (one code a byte); rows are padded with zero codes to
    a multiple of ``k_tile``. ``group_size`` is the input rows per scale (or
    exponent), null for one per output channel (or per layer: ``n1`` of
    shape ``()``).

Writes are atomic (a temporary file renamed over the target). Loading reads
the whole file and checks it before building anything, so a bad file raises
ValueError and returns nothing.
"""

import json
import math
import os
import tempfile
from typing import Any, Optional

import jax
import numpy as np

from quant_core import paths
from quant_core.deploy import codes
from quant_core.deploy import packed_layers

PyTree = Any

FORMAT = "quant_core.packed"
FORMAT_VERSION = "2"
LAYOUTS = {2: "nibbles_split_halves", 1: "bytes"}


def _leaf_entry(name: str, keys: list, leaf, tensors: dict) -> dict:
  """The metadata of one leaf; its tensors are added to ``tensors``."""
  if not packed_layers.is_packed_kernel(leaf):
    tensors[name] = np.asarray(leaf)
    return {"path": keys, "kind": "float"}
  layer = {}
  if isinstance(leaf, packed_layers.PackedLayer):
    form, matrices, groups = "layer", leaf.matrices, leaf.groups
    layer = {"kernel_perm": None if leaf.kernel_perm is None else list(leaf.kernel_perm),
             "dtype": leaf.dtype}
  else:
    form, matrices, groups = "kernel", leaf, 1
  pow2 = isinstance(matrices, codes.PackedPow2)
  if pow2:
    grid, fields = "pow2", {"n1": matrices.n1}
  else:
    grid = "symmetric" if matrices.symmetric else "asymmetric"
    fields = {"scale": matrices.scale}
    if not matrices.symmetric:
      fields["zero_point"] = matrices.zero_point
  fields["codes"] = matrices.data
  for field, array in fields.items():
    tensors[f"{name}.{field}"] = np.asarray(array)
  return {"path": keys, "kind": "pow2" if pow2 else "uniform", "form": form,
          "bits": matrices.bits, "grid": grid, "k_tile": matrices.k_tile,
          "layout": LAYOUTS[matrices.codes_per_byte],
          "group_size": matrices.group_size, "shape": list(matrices.shape),
          "kernel_shape": list(leaf.shape), "groups": groups, **layer}


def _serialize(packed_variables: PyTree) -> bytes:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  tensors, entries = {}, []
  flat, _ = jax.tree_util.tree_flatten_with_path(
      jax.device_get(packed_variables), is_leaf=packed_layers.is_packed_kernel)
  for path, leaf in flat:
    keys = [str(key) for key in paths.keys_of(path)]
    entries.append(_leaf_entry("/".join(keys), keys, leaf, tensors))
  metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "leaves": json.dumps(entries)}
  return safetensors_numpy.save(tensors, metadata=metadata)


def save_packed(path: str, packed_variables: PyTree) -> int:
  """Writes packed variables to ``path`` atomically (schema: module docstring).

  Args:
    path: the file to write (e.g. ``packed_model.safetensors``).
    packed_variables: nested dicts whose leaves are arrays or packed kernels
      (from :func:`quant_core.deploy.pack_quantization`,
      :func:`quant_core.deploy.pack_layers` or ``inq_jax.pack_model``).

  Returns:
    The file's size in bytes.

  Raises:
    FileNotFoundError: when the folder of ``path`` does not exist (nothing is
      written).
  """
  if not isinstance(packed_variables, dict):
    raise ValueError("packed_variables must be a dict of variables (e.g. from "
                     f"pack_quantization), got {type(packed_variables).__name__}.")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"cannot write {path}: the folder {directory} does not exist.")
  if os.path.isdir(path):
    raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name.")
  data = _serialize(packed_variables)
  with tempfile.NamedTemporaryFile(dir=directory, delete=False,
                                   suffix=".tmp") as f:
    try:
      f.write(data)
      # A temporary file is private (0600); the packed file gets the mode any
      # new file gets under the umask, like the other files of a workdir.
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(f.name, 0o666 & ~umask)
    except BaseException:
      os.unlink(f.name)
      raise
  try:
    os.replace(f.name, path)
  except BaseException:
    os.unlink(f.name)
    raise
  return len(data)


def fp32_file_bytes(variables: PyTree) -> int:
  """Bytes of a safetensors file holding every leaf of ``variables`` as
  float32: the FP32 checkpoint a packed file is compared with."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  flat, _ = jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(lambda v: v, variables))
  tensors = {paths.path_name(path): np.zeros(leaf.shape, np.float32)
             for path, leaf in flat}
  return len(safetensors_numpy.save(tensors))


def _read(path: str):
  """``(tensors, leaves)`` of a packed model file, or ValueError."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  try:
    tensors = safetensors_numpy.load(data)
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
  except Exception as error:  # safetensors raises its own error types
    raise ValueError(f"{path} is not a complete safetensors file "
                     f"(truncated or corrupt): {error}") from error
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path} is not a packed model file (format "
                     f"{metadata.get('format')!r}, expected {FORMAT!r}).")
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{path} has packed-model schema version "
        f"{metadata.get('format_version')!r}; this code reads version "
        f"{FORMAT_VERSION!r} only.")
  return tensors, json.loads(metadata["leaves"])


def _packed_leaf(entry: dict, name: str, tensors: dict):
  """The packed kernel of one metadata entry."""
  grid_fields = {"n1": None} if entry["kind"] == "pow2" else {
      "scale": None, "zero_point": None}
  for field in list(grid_fields) + ["codes"]:
    key = f"{name}.{field}"
    if key in tensors:
      grid_fields[field] = tensors[key]
    elif not (field == "zero_point" and entry["grid"] == "symmetric"):
      raise ValueError(f"tensor {key!r} is missing.")
  data = grid_fields.pop("codes")
  static = dict(shape=tuple(entry["shape"]), bits=entry["bits"],
                k_tile=entry["k_tile"], group_size=entry["group_size"])
  cls = codes.PackedPow2 if entry["kind"] == "pow2" else codes.PackedUniform
  matrices = cls(data=data, **grid_fields, **static)
  rows = codes.round_up(math.prod(static["shape"][:-1]), static["k_tile"])
  expected = (rows // matrices.codes_per_byte, static["shape"][-1])
  leading = (entry["groups"],) if entry["form"] == "layer" else ()
  if data.dtype != np.uint8 or data.shape != leading + expected:
    raise ValueError(f"{name}.codes has {data.dtype} {data.shape}, the "
                     f"metadata says uint8 {leading + expected}.")
  if entry["form"] == "kernel":
    return matrices
  kernel_perm = entry.get("kernel_perm")
  return packed_layers.PackedLayer(
      matrices=matrices, kernel_shape=tuple(entry["kernel_shape"]),
      kernel_perm=None if kernel_perm is None else tuple(kernel_perm),
      dtype=entry.get("dtype", "float32"))


def _set(tree: dict, keys: list, value) -> None:
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


def _expected_shapes(path: str, leaves: list, like: PyTree) -> dict:
  """``{leaf name: shape}`` of ``like``; ValueError unless the file holds
  the same leaf names."""
  expected = packed_layers.logical_shapes(like)
  found = {"/".join(entry["path"]) for entry in leaves}
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  if missing or extra:
    raise ValueError(f"{path} does not hold this model's layer tree: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}.")
  return expected


def load_packed(path: str, like: Optional[PyTree] = None) -> PyTree:
  """Reads a packed model file written by :func:`save_packed`.

  Args:
    path: the file.
    like: optional, what the file must match, leaf path by leaf path and
      (logical) shape: a linen model's variables (or their shapes, e.g.
      ``jax.eval_shape(model.init, ...)``), an NNX module (its ``nnx.Param``
      state), or packed variables.

  Returns:
    The packed variables (nested dicts of numpy arrays and packed kernels),
    ready for :func:`quant_core.deploy.packed_apply`.

  Raises:
    ValueError: for a truncated or corrupt file, another format or schema
      version, missing tensors, or a tree that differs from ``like``; nothing
      is returned then.
  """
  tensors, leaves = _read(path)
  expected = None if like is None else _expected_shapes(path, leaves, like)
  out = {}
  for entry in leaves:
    name = "/".join(entry["path"])
    if entry["kind"] == "float":
      if name not in tensors:
        raise ValueError(f"{path}: tensor {name!r} is missing.")
      leaf = tensors[name]
    else:
      try:
        leaf = _packed_leaf(entry, name, tensors)
      except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    if expected is not None and tuple(leaf.shape) != expected[name]:
      raise ValueError(f"{path}: {name} has shape {tuple(leaf.shape)}, the "
                       f"model's is {expected[name]}.")
    _set(out, entry["path"], leaf)
  return out
