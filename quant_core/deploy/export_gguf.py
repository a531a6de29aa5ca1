"""Export of quantized linear layers as GGUF tensors (llama.cpp's file format).

GGUF's legacy block formats quantize each row of a weight matrix (an output channel:
GGUF lists dimensions fastest first, so a ``(out, in)`` matrix is stored with the inputs
contiguous) in blocks of 32 consecutive inputs, each with float16 parameters:

* ``Q8_0`` (34 bytes a block): ``d``, then 32 int8 ``q``; a weight is ``d * q``.
* ``Q4_0`` (18 bytes): ``d``, then 16 bytes of 4-bit ``q``; a weight is ``d * (q - 8)``.
* ``Q4_1`` (20 bytes): ``d`` and ``m``, then 16 bytes of 4-bit ``q``; a weight is
  ``d * q + m``.

In the 4-bit blocks byte ``i`` holds ``q[i]`` in its low nibble and ``q[i + 16]`` in its
high nibble. ``gguf``'s de-quantizer computes these in float32 from the float16 ``d``
and ``m``.

Mapping of the uniform grids of :mod:`quant_core.grids` (codes ``c``, scale ``s``,
zero point ``z``; groups of 32 inputs or any multiple of 32, or one grid per channel,
since every block inherits its group's grid):

* 8 bits with ``c - z`` in ``-128..127`` (``grid="symmetric"``: ``z = 127``) is
  ``Q8_0`` with ``q = c - z``, ``d = s``;
* 4 bits whose levels ``l = c - z`` lie, per block, in ``-8..7`` is ``Q4_0`` with
  ``q = l + 8``, ``d = s``; a block with levels in ``-7..8`` is written ``q = 8 - l``
  with ``d = -s`` (the two layouts of ``grid="signed"``, llama.cpp's own Q4_0 rule,
  and the 15 levels of ``grid="symmetric"``). The levels decide, not the stored zero
  point, so a grid recovered from the weights' values maps the same way;
* 4 bits otherwise is ``Q4_1``: ``grid="offset"`` (``s * c + minimum``, the format's
  free minimum) with ``q = c``, ``d = s``, ``m = minimum``; an asymmetric grid only
  where ``m = -s * z`` is a float16 value.

The export is lossless: every weight is checked to equal the format's float32
de-quantization of what is written, which holds for grids built with
``scale_dtype="float16"`` (the solver setting of :mod:`comq_jax`); anything else is
refused, naming the layer and the setting. pow2 grids have no such form.

Reference: the GGUF specification and the block layouts of ggml (``block_q4_0``,
``block_q4_1``, ``block_q8_0``), as the ``gguf`` package reads and writes them.
"""

import os
import tempfile
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

from quant_core.deploy import export_gptq

BLOCK_SIZE = 32
TENSOR_TYPES = ("Q4_0", "Q4_1", "Q8_0")
FLOAT_TYPES = ("F32", "F16")
# Bytes of one block of 32 weights.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# general.file_type of a file whose quantized tensors are of one type (llama_ftype).
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}


class GGUFTensor(NamedTuple):
  """One quantized matrix in a GGUF block format.

  Attributes:
    tensor_type: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"`` (or any GGML type name, for
      blocks copied unchanged from another GGUF file).
    blocks: uint8 ``(rows, in_features / 32 * block bytes)``: row ``j`` holds the
      blocks of output channel ``j``.
    shape: ``(rows, in_features)``, the matrix in numpy (row-major) order.
  """
  tensor_type: str
  blocks: np.ndarray
  shape: tuple

  def permute_rows(self, order) -> "GGUFTensor":
    """The same tensor with its rows (output channels) in ``order``: rows move with
    their blocks, so a row permutation of a quantized matrix stays lossless."""
    return self._replace(blocks=np.ascontiguousarray(self.blocks[np.asarray(order)]))


def _fp16_exact(values: np.ndarray) -> bool:
  with np.errstate(over="ignore"):
    narrow = values.astype(np.float16)
  return bool(np.all(np.isfinite(narrow)) and np.array_equal(narrow.astype(np.float32),
                                                               values.astype(np.float32)))


def _nibbles(q: np.ndarray) -> np.ndarray:
  """``(rows, blocks, 32)`` 4-bit values as ``(rows, blocks, 16)`` bytes: byte ``i``
  holds value ``i`` (low nibble) and value ``i + 16`` (high nibble)."""
  q = q.astype(np.uint8)
  return q[..., :BLOCK_SIZE // 2] | (q[..., BLOCK_SIZE // 2:] << np.uint8(4))


def _q4_0_orientation(levels: np.ndarray):
  """Per block, whether its integer levels ``l`` fit Q4_0 as ``q = l + 8`` (``l`` in
  ``-8..7``) and as ``q = 8 - l`` with ``d = -s`` (``l`` in ``-7..8``)."""
  low, high = levels.min(axis=-1), levels.max(axis=-1)
  return (low >= -8) & (high <= 7), (low >= -7) & (high <= 8)


def _choose_type(source, upright: np.ndarray, flipped: np.ndarray) -> str:
  if source.bits == 8:
    return "Q8_0"
  if source.grid != "offset" and np.all(upright | flipped):
    return "Q4_0"
  return "Q4_1"


def layer_tensor(layer, *, tensor_type: Optional[str] = None,
                 name: str = "layer") -> GGUFTensor:
  """The GGUF blocks of one quantized linear layer (mapping: module docstring).

  Args:
    layer: a :class:`quant_core.grids.LayerQuantization` (``(d_in, d_out)``, or with
      the leading feature-group axis of :attr:`comq_jax.LayerReport.quantization`, of
      size 1), or a :class:`~quant_core.deploy.packed_layers.PackedLayer` / packed
      uniform weight of an ``(in, out)`` kernel.
    tensor_type: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"``, or None for the type the grid
      maps to.
    name: the layer's name in error messages.

  Returns:
    A :class:`GGUFTensor` of the ``(d_out, d_in)`` matrix.

  Raises:
    ValueError: naming the layer: a pow2 grid; a bit width the type does not hold;
      ``d_in`` or the group size not a multiple of 32; zero points or codes the type
      cannot express; or weights that are not the type's de-quantization of float16
      parameters exactly (quantize with ``scale_dtype="float16"``).
  """
  if tensor_type is not None and tensor_type not in TENSOR_TYPES:
    raise ValueError(f"tensor_type must be None or one of {TENSOR_TYPES}, got "
                     f"{tensor_type!r}.")
  source = export_gptq.uniform_layer(layer)
  if source.grid == "pow2":
    raise ValueError(f"{name}: a pow2 grid (values ±2^e) has no GGUF block form; GGUF "
                     "export holds uniform grids (grid='symmetric', 'signed', 'offset' or "
                     "'asymmetric').")
  if source.bits not in (4, 8):
    raise ValueError(f"{name}: GGUF export writes 4-bit (Q4_0, Q4_1) and 8-bit (Q8_0) "
                     f"codes, got bits={source.bits}.")
  k, n = source.weights.shape
  if k % BLOCK_SIZE:
    raise ValueError(f"{name}: in_features={k} is not a multiple of {BLOCK_SIZE}, the "
                     "GGUF block size.")
  if source.group_size is not None and source.group_size % BLOCK_SIZE:
    raise ValueError(f"{name}: group_size={source.group_size} is not a multiple of "
                     f"{BLOCK_SIZE}: every GGUF block of {BLOCK_SIZE} inputs has one scale; "
                     "quantize with group_size=32 (or a multiple, or per channel).")
  blocks = k // BLOCK_SIZE
  # Per block (rows = output channels): the grid of the group the block lies in.
  group_of_block = np.arange(blocks) * BLOCK_SIZE // (source.group_size or k)
  per_block = lambda a: np.asarray(a).T[:, group_of_block]  # (groups, N) -> (N, blocks)
  scale = per_block(source.scale).astype(np.float32)
  zero = per_block(source.zero).astype(np.int64)
  codes = np.asarray(source.codes).T.astype(np.int64).reshape(n, blocks, BLOCK_SIZE)
  weights = np.asarray(source.weights).T.astype(np.float32).reshape(n, blocks, BLOCK_SIZE)
  # The integer level of each weight: weights are scale * level (not for offset grids).
  levels = codes - zero[..., None]
  upright, flipped = _q4_0_orientation(levels)
  chosen = tensor_type or _choose_type(source, upright, flipped)
  if (chosen == "Q8_0") != (source.bits == 8):
    raise ValueError(f"{name}: {chosen} holds {8 if chosen == 'Q8_0' else 4}-bit codes, "
                     f"got bits={source.bits}.")
  minimum = None
  if chosen == "Q8_0":
    q, d = levels, scale
    if np.any((q < -128) | (q > 127)):
      raise ValueError(f"{name}: code - zero point outside -128..127, the int8 range of "
                       "Q8_0.")
  elif chosen == "Q4_0":
    if source.grid == "offset" or not np.all(upright | flipped):
      raise ValueError(f"{name}: Q4_0 holds d * (q - 8) with q in 0..15: every block's "
                       "levels code - zero point must lie in -8..7 or in -7..8 (grid="
                       "'signed' or 'symmetric' at 4 bits).")
    # A block of levels in -7..8 only (llama.cpp's positive extreme) is written with a
    # negative d: d * (q - 8) with d = -scale and q = 8 - level.
    flip = ~upright
    q = np.where(flip[..., None], 8 - levels, levels + 8)
    d = np.where(flip, -scale, scale)
  else:
    q, d = codes, scale
    if source.grid == "offset":
      minimum = per_block(source.minimum).astype(np.float32)
    else:
      minimum = (-scale * zero).astype(np.float32)
  if np.any((q < 0) | (q > 15)) and chosen != "Q8_0":
    raise ValueError(f"{name}: codes outside 0..15.")
  for label, values in (("scale", d), ("minimum", minimum)):
    if values is not None and not _fp16_exact(values):
      raise ValueError(
          f"{name}: a {label} is not a float16 value, and {chosen} stores float16 "
          "parameters; quantize with the solver setting scale_dtype='float16' "
          "(comq_jax.rtn / gptq / comq, or --config.<method>.scale_dtype=float16)"
          + (", with grid='offset' (the format's float minimum)"
             if label == "minimum" else "") + ".")
  decoded = d[..., None] * (q - 8 if chosen == "Q4_0" else q).astype(np.float32)
  if minimum is not None:
    decoded = decoded + minimum[..., None]
  if not np.array_equal(decoded, weights):
    bad = np.argwhere(decoded != weights)
    j, b, i = bad[0]
    raise ValueError(
        f"{name}: {len(bad)} of {weights.size} weights differ from their {chosen} "
        f"de-quantization (e.g. output {j}, input {b * BLOCK_SIZE + i}: "
        f"{weights[j, b, i]!r} vs {decoded[j, b, i]!r}); quantize with scale_dtype="
        "'float16' on a grid the type holds (Q4_1: grid='offset').")
  as_bytes = lambda a: np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(
      n, blocks, 2)
  d16 = as_bytes(d)
  if chosen == "Q8_0":
    payload = [d16, np.ascontiguousarray(q.astype(np.int8)).view(np.uint8)]
  elif chosen == "Q4_0":
    payload = [d16, _nibbles(q)]
  else:
    payload = [d16, as_bytes(minimum), _nibbles(q)]
  data = np.concatenate(payload, axis=-1).reshape(n, blocks * BLOCK_BYTES[chosen])
  return GGUFTensor(chosen, np.ascontiguousarray(data), (n, k))


class Field(NamedTuple):
  """A typed GGUF metadata value.

  Attributes:
    value: a number, bool, str, or a list of one of those.
    type: the ``gguf.GGUFValueType`` name (``"UINT32"``, ``"FLOAT32"``, ``"STRING"``,
      ``"BOOL"``, ``"ARRAY"``, ...).
    element_type: for ``"ARRAY"``, the type name of the elements.
  """
  value: Any
  type: str
  element_type: Optional[str] = None


def reader_fields(reader, *, skip_prefixes=("GGUF.", "general.file_type",
                                            "general.quantization_version",
                                            "general.architecture")) -> dict:
  """The metadata of a ``gguf.GGUFReader`` as :class:`Field` s, types kept, for
  copying into an export (the reader's own header fields and the fields an export
  sets itself are skipped)."""
  import gguf  # pylint: disable=import-outside-toplevel

  fields = {}
  for key, field in reader.fields.items():
    if key.startswith(tuple(skip_prefixes)):
      continue
    value_type = gguf.GGUFValueType(field.types[0])
    element_type = (gguf.GGUFValueType(field.types[-1]).name
                    if value_type == gguf.GGUFValueType.ARRAY else None)
    fields[key] = Field(field.contents(), value_type.name, element_type)
  return fields


def _file_type(matrix_types) -> int:
  """llama.cpp's ``general.file_type``: the most common type of the matrices, a block
  type if there is any ("mostly Q4_0")."""
  quantized = [kind for kind in matrix_types if kind in TENSOR_TYPES]
  kinds = quantized or list(matrix_types) or ["F32"]
  return FILE_TYPES[max(sorted(set(kinds)), key=kinds.count)]


def export_gguf(path: str, architecture: str, tensors: Mapping[str, Any], *,
                metadata: Optional[Mapping[str, Field]] = None,
                float_type: str = "F32") -> dict:
  """Writes a GGUF file: metadata, then the tensors in the order given.

  The file appears whole or not at all: it is written beside ``path`` and renamed
  over it.

  Args:
    path: the ``.gguf`` file to write.
    architecture: ``general.architecture`` (``"llama"``, ``"gemma3"``, ...).
    tensors: GGUF tensor name -> a :class:`GGUFTensor` (from :func:`layer_tensor`)
      or a float array in numpy order (a ``(out, in)`` matrix as torch holds it).
    metadata: key -> :class:`Field`; ``general.architecture``, ``general.file_type``
      and ``general.quantization_version`` are set here.
    float_type: ``"F32"`` (exact) or ``"F16"`` for the float tensors; 1-D tensors
      (norms, biases) stay F32, as llama.cpp keeps them.

  Returns:
    Tensor name -> GGUF type name, as written.

  Raises:
    ValueError: an unknown ``float_type`` or metadata type, a float tensor that is not
      finite in float16 with ``float_type="F16"``, or an empty metadata array.
    FileNotFoundError: when the folder of ``path`` does not exist.
  """
  import gguf  # pylint: disable=import-outside-toplevel

  if float_type not in FLOAT_TYPES:
    raise ValueError(f"float_type must be one of {FLOAT_TYPES}, got {float_type!r}.")
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist.")
  arrays, types, matrix_types = {}, {}, []
  for name, tensor in tensors.items():
    if isinstance(tensor, GGUFTensor):
      arrays[name], types[name] = tensor, tensor.tensor_type
      matrix_types.append(tensor.tensor_type)
      continue
    array = np.asarray(tensor, np.float32)
    kind = "F32" if array.ndim < 2 else float_type
    if array.ndim >= 2:
      matrix_types.append(kind)
    if kind == "F16":
      with np.errstate(over="ignore"):
        narrow = array.astype(np.float16)
      if not np.all(np.isfinite(narrow)):
        raise ValueError(f"{name}: a value is beyond float16's range (±65504); use "
                         "float_type='F32'.")
      array = narrow
    arrays[name], types[name] = np.ascontiguousarray(array), kind
  value_types = gguf.GGUFValueType.__members__
  entries = []
  for key, field in (metadata or {}).items():
    if field.type not in value_types or (field.type == "ARRAY"
                                         and field.element_type not in value_types):
      raise ValueError(f"metadata {key}: unknown GGUF value type {field.type!r} / "
                       f"{field.element_type!r}; known: {', '.join(value_types)}.")
    if field.type == "ARRAY" and len(field.value) == 0:
      raise ValueError(f"metadata {key}: GGUF cannot hold an empty array; leave the key "
                       "out.")
    entries.append((key, field))
  handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
  os.close(handle)
  try:
    writer = gguf.GGUFWriter(staging, architecture)
    writer.add_file_type(_file_type(matrix_types))
    if any(kind in TENSOR_TYPES for kind in types.values()):
      writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, field in entries:
      sub_type = (gguf.GGUFValueType[field.element_type] if field.type == "ARRAY"
                  else None)
      writer.add_key_value(key, field.value, gguf.GGUFValueType[field.type], sub_type)
    for name, array in arrays.items():
      if isinstance(array, GGUFTensor):
        writer.add_tensor(name, array.blocks,
                          raw_dtype=gguf.GGMLQuantizationType[array.tensor_type])
      else:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o666 & ~umask)  # mkstemp's file is private (0600)
    os.replace(staging, path)
  except BaseException:
    if os.path.exists(staging):
      os.remove(staging)
    raise
  return types

