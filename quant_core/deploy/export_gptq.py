"""Export of uniform-grid quantized layers as a GPTQ-format checkpoint.

The GPTQ checkpoint format (``quant_method: "gptq"``) is the layout that
transformers, vLLM and GPTQModel load. Per quantized linear layer of ``in_features``
inputs and ``out_features`` outputs, under its Hugging Face module name (e.g.
``model.layers.0.self_attn.q_proj``), it holds:

* ``qweight``: int32 ``(in_features * bits / 32, out_features)``, the ``bits``-bit
  codes ``q`` of each output column packed along the input axis: the column is a
  little-endian bit stream, input ``i`` at bits ``i * bits`` to ``(i + 1) * bits - 1``
  of the concatenated 32-bit words (for 2, 4 and 8 bits each word holds ``32 / bits``
  whole inputs, input ``i`` of word ``r`` at shift ``bits * (i - r * 32 / bits)``; for
  3 bits, 32 inputs fill three words and two inputs straddle a word boundary);
* ``qzeros``: int32 ``(groups, out_features * bits / 32)``, the zero points packed the
  same way along the output axis; checkpoint format ``"gptq"`` (v1) stores
  ``zero - 1``, ``"gptq_v2"`` stores ``zero``;
* ``scales``: float16 ``(groups, out_features)``, one row per group;
* ``g_idx``: int32 ``(in_features,)``, the group of each input.

A weight de-quantizes as ``scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j])``.
``config.json`` carries ``quantization_config`` (``quant_method``, ``bits``,
``group_size`` (-1 for one group per output channel), ``desc_act``, ``sym``,
``checkpoint_format``, ``lm_head``, ``pack_dtype``); ``quantize_config.json``
repeats it for the loaders that read that file.

Mapping of the grids of :mod:`quant_core.grids`:

* asymmetric: ``q = code``, ``zero = zero_point``, ``sym: false``; v1 can hold zero
  points ``1..2^bits`` only, v2 ``0..2^bits - 1``;
* symmetric (``2^bits - 1`` levels): ``q = code + 1`` and ``zero = 2^(bits - 1)``, the
  format's fixed symmetric zero point, ``sym: true``;
* pow2 grids have no such form and are refused.

The round trip is exact when every weight is ``fp16(scale) * (code - zero_point)``
in float32, which holds for grids built with ``scale_dtype="float16"``
(:func:`quant_core.grids.make_grid`; the solver setting of :mod:`comq_jax`);
anything else is refused, naming that setting. Groups are contiguous inputs
(``g_idx[i] = i // group_size``), also after GPTQ's act-order with static groups,
so ``desc_act`` is false: loaders then read the groups in input order.

Reference: the checkpoint layout of AutoGPTQ / GPTQModel (``qweight``, ``qzeros``,
``scales``, ``g_idx``; ``checkpoint_format`` ``gptq`` and ``gptq_v2``), as described
in D. de Kok, "GPTQ checkpoint format" (danieldk.eu/GPTQ-Checkpoint-Format); the
method: E. Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

from quant_core import grids
from quant_core.deploy import codes as codes_lib
from quant_core.deploy import packed_layers

FORMATS = ("gptq", "gptq_v2")
BITS = (2, 3, 4, 8)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"


class GPTQTensors(NamedTuple):
  """The four tensors of one layer in the GPTQ format (numpy).

  Attributes:
    qweight: int32 ``(in_features * bits / 32, out_features)``.
    qzeros: int32 ``(groups, out_features * bits / 32)``.
    scales: float16 ``(groups, out_features)``.
    g_idx: int32 ``(in_features,)``.
  """
  qweight: np.ndarray
  qzeros: np.ndarray
  scales: np.ndarray
  g_idx: np.ndarray


class UniformLayer(NamedTuple):
  """A uniform-grid matrix in one form: ``weights == scale * (codes - zero)``, or
  ``scale * codes + minimum`` for an ``"offset"`` grid.

  ``codes`` and ``weights`` are ``(K, N)``; ``scale``, ``zero`` and ``minimum``
  ``(groups, N)``; ``minimum`` is None except for offset grids. All None for pow2."""
  codes: np.ndarray
  scale: np.ndarray
  zero: np.ndarray
  weights: np.ndarray
  bits: int
  grid: str
  group_size: Optional[int]
  minimum: Optional[np.ndarray] = None


def _from_quantization(result) -> UniformLayer:
  """A :class:`quant_core.grids.LayerQuantization` (2-D, or one feature group)."""
  weights, codes = np.asarray(result.weights), np.asarray(result.codes)
  scale, zero = np.asarray(result.scale), np.asarray(result.zero_point)
  levels = np.asarray(result.levels)
  if weights.ndim == 3:  # a LayerReport's quantization: leading feature-group axis
    if weights.shape[0] != 1:
      raise ValueError(f"a layer with {weights.shape[0]} feature groups (a grouped "
                       "convolution) has no such form; it holds linear layers.")
    weights, codes, scale, zero, levels = (weights[0], codes[0], scale[0], zero[0],
                                           levels[0])
  if weights.ndim != 2:
    raise ValueError(f"expected a (d_in, d_out) matrix, got weights of shape "
                     f"{weights.shape}.")
  # (d_out,) per channel or (d_out, groups): the format's rows are the groups.
  scale = scale.reshape(scale.shape[0], -1).T
  zero = zero.reshape(zero.shape[0], -1).T
  # An offset grid's first level is its minimum exactly (code 0: 0 * scale + minimum).
  minimum = (levels[..., 0].reshape(levels.shape[0], -1).T if result.grid == "offset"
             else None)
  return UniformLayer(codes, scale, zero, weights, result.bits, result.grid,
                      result.group_size, minimum)


def _from_packed(leaf) -> UniformLayer:
  """A :class:`~quant_core.deploy.packed_layers.PackedLayer` or a bare packed weight."""
  matrices = leaf.matrices if isinstance(leaf, packed_layers.PackedLayer) else leaf
  if isinstance(leaf, packed_layers.PackedLayer):
    if leaf.groups != 1:
      raise ValueError(f"a layer with {leaf.groups} feature groups (a grouped "
                       "convolution) has no such form; it holds linear layers.")
    if len(leaf.kernel_shape) != 2 or leaf.kernel_perm != (0, 1):
      raise ValueError(f"a kernel of shape {leaf.kernel_shape} is not an (in, out) "
                       "linear weight; the format holds linear layers.")
    matrices = leaf.group(0)
  if isinstance(matrices, codes_lib.PackedPow2):
    return UniformLayer(None, None, None, None, matrices.bits, "pow2", matrices.group_size)
  k, n = matrices.k, matrices.n
  codes = np.asarray(codes_lib.unpack_codes(matrices))[:k].reshape(k, n).astype(np.int64)
  scale = np.asarray(matrices.scale).reshape(-1, n)
  if matrices.symmetric:
    zero, grid = np.full(scale.shape, matrices.symmetric_zero_point), "symmetric"
  else:
    zero, grid = np.asarray(matrices.zero_point).reshape(-1, n), "asymmetric"
  weights = np.asarray(codes_lib.unpack_matrix(matrices)).reshape(k, n)
  return UniformLayer(codes, scale, zero, weights, matrices.bits, grid, matrices.group_size)


def uniform_layer(layer) -> UniformLayer:
  """The :class:`UniformLayer` form of a quantized linear layer: a
  :class:`quant_core.grids.LayerQuantization` (``(d_in, d_out)``, or with a leading
  feature-group axis of size 1), a :class:`~quant_core.deploy.packed_layers.PackedLayer`
  or a bare packed weight.

  Raises:
    ValueError: for anything else, or a grouped layer.
  """
  if isinstance(layer, grids.LayerQuantization):
    return _from_quantization(layer)
  if packed_layers.is_packed_kernel(layer):
    return _from_packed(layer)
  raise ValueError("a layer must be a quant_core.grids.LayerQuantization, a PackedLayer "
                   f"or a packed weight, got {type(layer).__name__}.")


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """``(M, L)`` codes in ``[0, 2^bits)`` as ``(M, L * bits / 32)`` int32 words: each
  row a little-endian bit stream, value ``l`` at bits ``l * bits ...``."""
  m, length = values.shape
  shifts = np.arange(bits, dtype=np.uint32)
  stream = ((values.astype(np.uint32)[:, :, None] >> shifts) & 1).astype(np.uint8)
  packed = np.packbits(stream.reshape(m, length * bits), axis=1, bitorder="little")
  return np.ascontiguousarray(packed).view("<u4").astype(np.uint32).view(np.int32)


def _check_shape(name: str, what: str, size: int, bits: int) -> None:
  if size * bits % 32:
    raise ValueError(f"{name}: {what}={size} is not a multiple of {32 // np.gcd(32, bits)}"
                     f": the format packs {bits}-bit values into whole 32-bit words "
                     f"along that axis.")


def _mismatch(name: str, weights, decoded) -> str:
  bad = np.argwhere(weights != decoded)
  i, j = bad[0]
  return (f"{name}: {len(bad)} of {weights.size} weights are not float16 scale * (code "
          f"- zero) exactly (e.g. input {i}, output {j}: {weights[i, j]!r} vs "
          f"{decoded[i, j]!r}); the format stores float16 scales. Quantize with the "
          "solver setting scale_dtype='float16' (comq_jax.rtn / gptq / comq, or "
          "--config.<method>.scale_dtype=float16), which holds the scales to float16 "
          "values.")


def layer_tensors(layer, *, checkpoint_format: str = "gptq",
                  name: str = "layer") -> tuple:
  """The GPTQ-format tensors of one quantized linear layer.

  Args:
    layer: a :class:`quant_core.grids.LayerQuantization` (``(d_in, d_out)``, or with
      the leading feature-group axis of :attr:`comq_jax.LayerReport.quantization`,
      of size 1), or a :class:`~quant_core.deploy.packed_layers.PackedLayer` /
      packed uniform weight of an ``(in, out)`` kernel.
    checkpoint_format: ``"gptq"`` (v1: stores ``zero - 1``) or ``"gptq_v2"``.
    name: the layer's name in error messages.

  Returns:
    ``(tensors, settings)``: a :class:`GPTQTensors` and the layer's
    ``{"bits", "group_size", "sym"}`` as ``quantization_config`` states them
    (``group_size`` -1 for one group per output channel).

  Raises:
    ValueError: a pow2 grid, a bit width other than 2, 3, 4 or 8, a zero point
      outside the format's range, sizes that do not fill whole 32-bit words, or
      weights that are not ``fp16(scale) * (code - zero)`` exactly; the message
      names the layer and the cause.
  """
  if checkpoint_format not in FORMATS:
    raise ValueError(f"checkpoint_format must be one of {FORMATS}, got "
                     f"{checkpoint_format!r}.")
  source = uniform_layer(layer)
  if source.grid == "pow2":
    raise ValueError(f"{name}: a pow2 grid (values ±2^e) is not scale * (code - zero); "
                     "the GPTQ format holds uniform grids only (grid='asymmetric' or "
                     "'symmetric').")
  if source.grid == "offset":
    raise ValueError(f"{name}: an offset grid (scale * code + a float minimum) has no "
                     "integer zero point; the GPTQ format holds grid='asymmetric', "
                     "'symmetric' or 'signed' (offset grids export to GGUF Q4_1).")
  bits = source.bits
  if bits not in BITS:
    raise ValueError(f"{name}: the GPTQ format holds {BITS}-bit codes, got bits={bits}.")
  k, n = source.weights.shape
  _check_shape(name, "in_features", k, bits)
  _check_shape(name, "out_features", n, bits)
  groups = grids.num_groups(k, source.group_size)
  if source.scale.shape != (groups, n):
    raise ValueError(f"{name}: scales of shape {source.scale.shape}, expected "
                     f"{(groups, n)} for group_size={source.group_size}.")
  codes = source.codes.astype(np.int64)
  zero = source.zero.astype(np.int64)
  sym = source.grid == "symmetric"
  if sym:  # 2^bits - 1 levels around the format's fixed zero point 2^(bits-1)
    codes, zero = codes + 1, zero + 1
  top = 2**bits - 1
  low, high = (1, top + 1) if checkpoint_format == "gptq" else (0, top)
  if sym and not np.all(zero == 2**(bits - 1)):
    raise ValueError(f"{name}: a symmetric grid with zero points other than "
                     f"{2**(bits - 1) - 1}.")
  if np.any((zero < low) | (zero > high)):
    j = np.argwhere((zero < low) | (zero > high))[0]
    raise ValueError(
        f"{name}: zero point {int(zero[tuple(j)])} (group {j[0]}, output {j[1]}) is "
        f"outside {low}..{high}, the range checkpoint_format={checkpoint_format!r} "
        f"holds at {bits} bits" + (" (v1 stores zero - 1; 'gptq_v2' holds 0)."
                                   if checkpoint_format == "gptq" else "."))
  if np.any((codes < 0) | (codes > top)):
    raise ValueError(f"{name}: codes outside 0..{top}.")
  scales = np.ascontiguousarray(source.scale.astype(np.float16))
  if not np.all(np.isfinite(scales)):
    raise ValueError(f"{name}: a scale is not finite in float16 (beyond ±65504).")
  g_idx = (np.arange(k) // (source.group_size or k)).astype(np.int32)
  weights = np.asarray(source.weights).astype(np.float32)
  decoded = scales.astype(np.float32)[g_idx] * (codes - zero[g_idx]).astype(np.float32)
  if not np.array_equal(weights, decoded):
    raise ValueError(_mismatch(name, weights, decoded))
  stored_zero = zero - 1 if checkpoint_format == "gptq" else zero
  tensors = GPTQTensors(qweight=np.ascontiguousarray(_pack_bits(codes.T, bits).T),
                        qzeros=_pack_bits(stored_zero, bits), scales=scales, g_idx=g_idx)
  settings = {"bits": bits, "group_size": -1 if source.group_size is None
              else source.group_size, "sym": sym}
  return tensors, settings


def quantization_config(settings: Mapping[str, Any], *,
                        checkpoint_format: str = "gptq",
                        lm_head: bool = False) -> dict:
  """The ``quantization_config`` of ``config.json`` for layers of these settings.

  Args:
    settings: ``{"bits", "group_size", "sym"}`` of the layers (:func:`layer_tensors`).
    checkpoint_format: ``"gptq"`` or ``"gptq_v2"``.
    lm_head: whether the output head is among the quantized layers.

  Returns:
    A JSON-ready dict.
  """
  return {"quant_method": "gptq", "bits": settings["bits"],
          "group_size": settings["group_size"], "desc_act": False,
          "sym": settings["sym"], "checkpoint_format": checkpoint_format,
          "lm_head": lm_head, "pack_dtype": "int32"}


def _replace_folder(path: str, write) -> None:
  """Writes a folder atomically: ``write(temporary folder)``, then a rename over
  ``path`` (an existing ``path`` is moved aside first and removed after)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f"cannot write {path}: the folder {parent} does not exist.")
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"cannot write {path}: it is a file; give a folder name.")
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.")
  try:
    write(staging)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private (0700)
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old.")
      os.replace(path, os.path.join(old, "previous"))
    os.replace(staging, path)
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def export_gptq(path: str, layers: Mapping[str, Any], tensors: Mapping[str, Any], *,
                model_config: Optional[Mapping[str, Any]] = None,
                checkpoint_format: str = "gptq", lm_head: bool = False,
                float_dtype: Optional[str] = "float16") -> dict:
  """Writes a GPTQ-format checkpoint folder: ``model.safetensors``, ``config.json``
  and ``quantize_config.json`` (layout: module docstring).

  Every layer is converted and checked before anything is written, and the folder
  appears whole or not at all (written beside it, then renamed; an existing folder
  at ``path`` is replaced).

  Args:
    path: the folder to write.
    layers: Hugging Face module name (e.g. ``"model.layers.0.mlp.up_proj"``) ->
      quantized layer, as :func:`layer_tensors` takes it; written as
      ``NAME.qweight``, ``NAME.qzeros``, ``NAME.scales`` and ``NAME.g_idx``.
    tensors: Hugging Face key -> float array (embeddings, norms, biases, a float
      ``lm_head.weight``), in torch layout.
    model_config: the model's Hugging Face ``config.json`` fields, to which
      ``quantization_config`` is added.
    checkpoint_format: ``"gptq"`` (v1, what every loader reads) or ``"gptq_v2"``.
    lm_head: whether ``layers`` holds the output head.
    float_dtype: dtype the float tensors are stored in (float16, as GPTQ
      checkpoints hold them), or None to keep each one's own.

  Returns:
    The ``quantization_config`` written.

  Raises:
    ValueError: as :func:`layer_tensors` for any layer; layers of different bit
      widths, group sizes or grid kinds (``quantization_config`` holds one of each);
      no layers; a key written twice.
    FileNotFoundError: when the folder above ``path`` does not exist.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  if not layers:
    raise ValueError("no quantized layers to export.")
  out, settings, first = {}, None, None
  for name, layer in layers.items():
    layer_out, layer_settings = layer_tensors(layer, checkpoint_format=checkpoint_format,
                                              name=name)
    if settings is None:
      settings, first = layer_settings, name
    elif layer_settings != settings:
      raise ValueError(
          f"{name} has {layer_settings}, {first} has {settings}: quantization_config "
          "holds one bit width, group size and grid kind (sym) for every layer; "
          "quantize them alike.")
    for field, array in layer_out._asdict().items():
      out[f"{name}.{field}"] = array
  for key, array in tensors.items():
    if key in out:
      raise ValueError(f"{key} is both a float tensor and a quantized layer's tensor.")
    array = np.asarray(array)
    out[key] = np.ascontiguousarray(array if float_dtype is None
                                    else array.astype(float_dtype))
  config = quantization_config(settings, checkpoint_format=checkpoint_format,
                               lm_head=lm_head)
  full_config = dict(model_config or {}, quantization_config=config)
  if float_dtype is not None:
    full_config["torch_dtype"] = float_dtype
  # safetensors writes each array's buffer as it lies: C order for all.
  data = safetensors_numpy.save({key: np.ascontiguousarray(array) for key, array in out.items()},
                                metadata={"format": "pt"})

  def write(folder):
    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
      f.write(data)
    for file_name, content in ((CONFIG_FILE, full_config), (QUANTIZE_CONFIG_FILE, config)):
      with open(os.path.join(folder, file_name), "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")

  _replace_folder(path, write)
  return config


def export_model_quantization(path: str, result, names: Mapping[str, str],
                              tensors: Mapping[str, Any], **kwargs) -> dict:
  """:func:`export_gptq` of a :class:`comq_jax.ModelQuantization`'s layers.

  Args:
    path: the folder to write.
    result: the ``ModelQuantization`` (its layer reports must hold their codes:
      a fresh result, not one rebuilt from a record).
    names: our ``/``-joined layer path -> Hugging Face module name, for every
      quantized layer.
    tensors: the float tensors, as :func:`export_gptq` takes them.
    **kwargs: :func:`export_gptq`'s keyword arguments.

  Returns:
    The ``quantization_config`` written.

  Raises:
    ValueError: a layer without codes or without a name, or as :func:`export_gptq`.
  """
  layers = {}
  for report in result.layers:
    if report.quantization is None:
      raise ValueError(f"{report.path}: the report holds no codes (rebuilt from a "
                       "record); export the result quantize_model returned.")
    if report.path not in names:
      raise ValueError(f"{report.path} has no Hugging Face module name in names.")
    if getattr(report.view, "kernel_perm", (0, 1)) != (0, 1):
      raise ValueError(f"{report.path}: its kernel is not an (in, out) linear weight.")
    layers[names[report.path]] = report.quantization
  return export_gptq(path, layers, tensors, **kwargs)
