"""GGUF block export (quant_core.deploy.export_gguf), read back by the ``gguf`` package.

Every round trip writes a real file, opens it with ``gguf.GGUFReader`` and de-quantizes
with ``gguf.quants.dequantize`` (the package's own Q4_0 / Q4_1 / Q8_0 decoders), so the
check is independent of our writer: the de-quantized tensor must equal the solver's
weights bit for bit.
"""

import os

import jax
import numpy as np
import pytest

import comq_jax
from quant_core.deploy import codes as codes_lib
from quant_core.deploy import export_gguf

gguf = pytest.importorskip("gguf")
F16 = "float16"


def layer_data(d_in=128, d_out=48, seed=0):
  x = jax.random.normal(jax.random.key(seed), (256, d_in))
  w = 0.1 * jax.random.normal(jax.random.key(seed + 1), (d_in, d_out))
  # A few outlier inputs, as in real layers, so the groups' ranges differ.
  w = w.at[::17].multiply(6.0)
  return w, x


def write_and_read(tmp_path, tensors, **kwargs):
  """``{name: (type name, float32 numpy array)}`` of a file written by export_gguf and
  read back with gguf's reader and de-quantizer."""
  path = os.path.join(tmp_path, "model.gguf")
  export_gguf.export_gguf(path, "llama", tensors, **kwargs)
  reader = gguf.GGUFReader(path)
  out = {}
  for tensor in reader.tensors:
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    out[tensor.name] = (tensor.tensor_type.name, np.asarray(values, np.float32).reshape(shape))
  return out, reader


SOLVERS = {"rtn": comq_jax.rtn, "gptq": comq_jax.gptq, "comq": comq_jax.comq}
# (method, bits, grid, group_size, the type it maps to): every solver on each type's own
# grid with groups of 32, and round-to-nearest on the other mappings (per channel, groups
# of 64, the symmetric 4-bit grid).
CASES = [(method, *case) for method in sorted(SOLVERS) for case in [
    (8, "symmetric", 32, "Q8_0"), (4, "signed", 32, "Q4_0"), (4, "offset", 32, "Q4_1")]] + [
    ("rtn", 8, "symmetric", None, "Q8_0"),
    ("rtn", 4, "symmetric", 32, "Q4_0"),
    ("gptq", 4, "signed", 64, "Q4_0"),
    ("comq", 4, "offset", None, "Q4_1"),
]


@pytest.mark.parametrize("method, bits, grid, group_size, tensor_type", CASES)
def test_round_trip_through_gguf_dequantizer_is_exact(tmp_path, method, bits, grid,
                                                      group_size, tensor_type):
  w, x = layer_data()
  granularity = "channel" if group_size is None else "group"
  options = dict(bits=bits, grid=grid, granularity=granularity, group_size=group_size,
                 scale_dtype=F16)
  if method == "comq":
    options["scale_update"] = True
  result = SOLVERS[method](**options).quantize_layer(w, x)
  tensor = export_gguf.layer_tensor(result, name="w")
  assert tensor.tensor_type == tensor_type and tensor.shape == (48, 128)
  read, _ = write_and_read(tmp_path, {"w": tensor})
  kind, values = read["w"]
  assert kind == tensor_type
  np.testing.assert_array_equal(values, np.asarray(result.weights).T)
  if grid != "offset":  # The packed form of the same result exports the same bytes.
    packed = codes_lib.pack_layer_quantization(result)
    np.testing.assert_array_equal(export_gguf.layer_tensor(packed).blocks, tensor.blocks)


def test_a_forced_type_is_checked_on_the_values_not_the_grid_name(tmp_path):
  """Q4_1 holds a signed grid's d * (c - z) as d * c + m with m = -z d: exact when every
  block's extreme is negative (z = 8, so m = -8 d is a float16 value), refused when
  -7 d is not a float16 value."""
  rng = np.random.default_rng(1)
  w = rng.uniform(-0.5, 0.5, size=(64, 6)).astype(np.float32)
  w[[3, 40], :] = -1.0 - rng.uniform(0, 0.3, size=(2, 6)).astype(np.float32)
  negative = comq_jax.rtn(bits=4, grid="signed", granularity="group", group_size=32,
                          scale_dtype=F16).quantize_layer(w)
  assert np.all(np.asarray(negative.zero_point) == 8)
  read, _ = write_and_read(tmp_path, {"w": export_gguf.layer_tensor(negative,
                                                                    tensor_type="Q4_1")})
  assert read["w"][0] == "Q4_1"
  np.testing.assert_array_equal(read["w"][1], np.asarray(negative.weights).T)
  positive = comq_jax.rtn(bits=4, grid="signed", granularity="group", group_size=32,
                          scale_dtype=F16).quantize_layer(-w)
  assert np.all(np.asarray(positive.zero_point) == 7)
  with pytest.raises(ValueError, match="minimum is not a float16 value"):
    export_gguf.layer_tensor(positive, tensor_type="Q4_1")


def test_llama_cpp_q4_0_rule_is_the_signed_grid():
  """grid='signed' with float16 steps gives llama.cpp's Q4_0 blocks: its scale is
  max / -8 of the block's largest-magnitude weight, and that weight is q = 0 exactly
  when its magnitude / 8 is a float16 value."""
  rng = np.random.default_rng(3)
  # Multiples of 1/64 not congruent to 4 mod 8: no weight is halfway between two levels
  # (llama.cpp rounds halves up, the solvers to the lower level).
  k = rng.integers(-40, 40, size=(64, 4))
  k = np.where(k % 8 == 4, k + 1, k)
  w = (k / 64.0).astype(np.float32)
  w[5, :] = [-1.0, 1.0, 1.0, -1.0]  # the extreme of block 0 of each column
  w[40, :] = [1.0, -1.0, 1.0, -1.0]  # and of block 1
  result = comq_jax.rtn(bits=4, grid="signed", granularity="group", group_size=32,
                        scale_dtype=F16).quantize_layer(w)
  tensor = export_gguf.layer_tensor(result)
  reference = gguf.quants.quantize(w.T.copy(), gguf.GGMLQuantizationType.Q4_0)
  np.testing.assert_array_equal(tensor.blocks, reference)


def test_float_tensors_and_metadata_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  norm = rng.normal(size=(16,)).astype(np.float32)
  embed = rng.normal(size=(10, 16)).astype(np.float32)
  metadata = {
      "llama.block_count": export_gguf.Field(2, "UINT32"),
      "llama.rope.freq_base": export_gguf.Field(10000.0, "FLOAT32"),
      "general.name": export_gguf.Field("tiny", "STRING"),
      "tokenizer.ggml.tokens": export_gguf.Field(["a", "b"], "ARRAY", "STRING"),
      "tokenizer.ggml.token_type": export_gguf.Field([1, 3], "ARRAY", "INT32"),
      "tokenizer.ggml.add_bos_token": export_gguf.Field(True, "BOOL"),
  }
  read, reader = write_and_read(tmp_path, {"norm": norm, "embed": embed},
                                metadata=metadata, float_type="F16")
  assert read["norm"][0] == "F32" and read["embed"][0] == "F16"
  np.testing.assert_array_equal(read["norm"][1], norm)
  np.testing.assert_array_equal(read["embed"][1], embed.astype(np.float16).astype(np.float32))
  fields = export_gguf.reader_fields(reader)
  assert fields == metadata
  assert reader.fields["general.architecture"].contents() == "llama"
  assert reader.fields["general.file_type"].contents() == export_gguf.FILE_TYPES["F16"]


def quantized(bits=4, grid="signed", group_size=32, d_in=128, scale_dtype=F16, **kwargs):
  w, x = layer_data(d_in=d_in)
  granularity = "channel" if group_size is None else "group"
  return comq_jax.rtn(bits=bits, grid=grid, granularity=granularity,
                      group_size=group_size, scale_dtype=scale_dtype, **kwargs
                      ).quantize_layer(w, x)


@pytest.mark.parametrize("make, kwargs, match", [
    (lambda: quantized(grid="pow2", scale_dtype=None), {}, "pow2 grid"),
    (lambda: quantized(bits=3), {}, "bits=3"),
    (lambda: quantized(group_size=48, d_in=96), {}, "group_size=48"),
    (lambda: quantized(d_in=80, group_size=None), {}, "in_features=80"),
    (lambda: quantized(scale_dtype=None), {}, "scale_dtype='float16'"),
    (lambda: quantized(grid="asymmetric"), {}, "grid='offset'"),
    (lambda: quantized(grid="offset"), {"tensor_type": "Q4_0"}, "-8..7 or in -7..8"),
    (lambda: quantized(), {"tensor_type": "Q8_0"}, "Q8_0 holds 8-bit"),
    (lambda: quantized(), {"tensor_type": "Q5_K"}, "tensor_type must be"),
])
def test_layers_the_formats_cannot_hold_are_refused(make, kwargs, match):
  with pytest.raises(ValueError, match=match):
    export_gguf.layer_tensor(make(), **kwargs)


def test_a_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
  path = os.path.join(tmp_path, "model.gguf")
  export_gguf.export_gguf(path, "llama", {"a": np.ones((4, 4), np.float32)})
  before = open(path, "rb").read()

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
  with pytest.raises(OSError, match="disk full"):
    export_gguf.export_gguf(path, "llama", {"b": np.zeros((4, 4), np.float32)})
  assert sorted(os.listdir(tmp_path)) == ["model.gguf"]
  assert open(path, "rb").read() == before
  with pytest.raises(ValueError, match="float_type must be"):
    export_gguf.export_gguf(path, "llama", {}, float_type="BF16")
  with pytest.raises(ValueError, match="empty array"):
    export_gguf.export_gguf(path, "llama", {}, metadata={
        "tokenizer.ggml.merges": export_gguf.Field([], "ARRAY", "STRING")})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export_gguf.export_gguf(os.path.join(tmp_path, "no", "m.gguf"), "llama", {})
