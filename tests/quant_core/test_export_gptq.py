"""GPTQ-format export (quant_core.deploy.export_gptq), checked by a reader of its own.

The reader below follows the format's description (AutoGPTQ / GPTQModel layout, as in
D. de Kok, "GPTQ checkpoint format"), not the writer: ``qweight`` (in * bits / 32, out)
int32 words along the input axis, lowest bits first; for 3 bits, 32 inputs in three
words with inputs 10 and 21 split over two words; ``qzeros`` the same along the output
axis, storing ``zero - 1`` in format "gptq" (v1); ``scales`` (groups, out) float16;
``g_idx`` the group of each input; ``w[i, j] = scales[g_idx[i], j] * (q[i, j] -
zero[g_idx[i], j])``.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

import comq_jax
from quant_core import grids
from quant_core.deploy import export_gptq
from quant_core.deploy import packed_layers
from quant_core import layers as layers_lib

F16 = "float16"


# ----------------------------------------------------------------------------- reader


def unpack_words(words: np.ndarray, bits: int) -> np.ndarray:
  """``(R, C)`` 32-bit words of values packed along axis 0 -> ``(R * 32 / bits, C)``."""
  words = words.view(np.uint32).astype(np.uint64)
  if bits == 3:
    rows = []
    for w0, w1, w2 in words.reshape(-1, 3, words.shape[1]):
      values = [(w0 >> (3 * j)) & 7 for j in range(10)]
      values.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
      values += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
      values.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
      values += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
      rows.extend(values)
    return np.stack(rows).astype(np.int64)
  per_word, mask = 32 // bits, (1 << bits) - 1
  values = [(words >> (bits * j)) & mask for j in range(per_word)]
  # Word r holds inputs r * per_word + j.
  return np.stack(values, axis=1).reshape(-1, words.shape[1]).astype(np.int64)


def read_gptq(folder) -> tuple:
  """``({module name: float32 (out, in) weight}, config.json, all tensors)``."""
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  quant = config["quantization_config"]
  bits = quant["bits"]
  tensors = safetensors_numpy.load_file(os.path.join(folder, "model.safetensors"))
  weights = {}
  for key in tensors:
    if not key.endswith(".qweight"):
      continue
    name = key[:-len(".qweight")]
    q = unpack_words(tensors[name + ".qweight"], bits)
    zeros = unpack_words(tensors[name + ".qzeros"].T, bits).T
    if quant["checkpoint_format"] == "gptq":
      zeros = zeros + 1
    scales = tensors[name + ".scales"]
    g_idx = tensors[name + ".g_idx"]
    assert scales.dtype == np.float16 and g_idx.dtype == np.int32
    w = scales[g_idx].astype(np.float32) * (q - zeros[g_idx]).astype(np.float32)
    weights[name] = w.T
  return weights, config, tensors


# ----------------------------------------------------------------------------- data


def layer_data(d_in=256, d_out=64, seed=0):
  x = jax.random.normal(jax.random.key(seed), (512, d_in))
  w = 0.05 * jax.random.normal(jax.random.key(seed + 1), (d_in, d_out))
  return w, x


def export_one(tmp_path, result, name="model.layers.0.mlp.up_proj", **kwargs):
  folder = str(tmp_path / "ckpt")
  export_gptq.export_gptq(folder, {name: result}, {}, **kwargs)
  weights, config, tensors = read_gptq(folder)
  return weights[name], config, tensors


CASES = {
    "rtn_4bit_g128_asym": lambda: comq_jax.rtn(4, granularity="group", group_size=128,
                                               scale_dtype=F16),
    "rtn_4bit_g128_sym": lambda: comq_jax.rtn(4, grid="symmetric", granularity="group",
                                              group_size=128, scale_dtype=F16),
    "gptq_4bit_g128_asym_act_order": lambda: comq_jax.gptq(
        4, granularity="group", group_size=128, act_order=True, static_groups=True,
        scale_dtype=F16),
    "gptq_4bit_g128_sym_act_order": lambda: comq_jax.gptq(
        4, grid="symmetric", granularity="group", group_size=128, act_order=True,
        static_groups=True, scale_dtype=F16),
    "comq_4bit_g128_scale_update": lambda: comq_jax.comq(
        4, iters=2, scale_update=True, granularity="group", group_size=128,
        scale_dtype=F16),
    "gptq_8bit_channel": lambda: comq_jax.gptq(8, scale_dtype=F16),
    "rtn_2bit_g64_sym": lambda: comq_jax.rtn(2, grid="symmetric", granularity="group",
                                             group_size=64, scale_dtype=F16),
    "comq_3bit_channel_sym": lambda: comq_jax.comq(3, grid="symmetric", scale_dtype=F16),
    "rtn_3bit_g128_asym": lambda: comq_jax.rtn(3, granularity="group", group_size=128,
                                               scale_dtype=F16),
    "comq_4bit_channel_scale_update": lambda: comq_jax.comq(4, scale_update=True,
                                                            scale_dtype=F16),
    "rtn_4bit_layer": lambda: comq_jax.rtn(4, granularity="layer", scale_dtype=F16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reader_gets_the_quantized_weights_back_exactly(tmp_path, case):
  solver = CASES[case]()
  w, x = layer_data()
  result = solver.quantize_layer(w, x)
  read, config, tensors = export_one(tmp_path, result)
  np.testing.assert_array_equal(read, np.asarray(result.weights).T)
  quant = config["quantization_config"]
  group_size = solver.group_size if solver.granularity == "group" else -1
  assert (quant["bits"], quant["group_size"], quant["sym"]) == (
      solver.bits, group_size, solver.grid == "symmetric")
  name = "model.layers.0.mlp.up_proj"
  groups = 1 if group_size == -1 else 256 // group_size
  assert tensors[name + ".qweight"].shape == (256 * solver.bits // 32, 64)
  assert tensors[name + ".qzeros"].shape == (groups, 64 * solver.bits // 32)
  assert tensors[name + ".scales"].shape == (groups, 64)
  np.testing.assert_array_equal(tensors[name + ".g_idx"],
                                np.arange(256) // (256 if group_size == -1 else group_size))


def test_gptq_v2_stores_the_zero_points_themselves(tmp_path):
  w, x = layer_data()
  result = comq_jax.rtn(4, granularity="group", group_size=128,
                        scale_dtype=F16).quantize_layer(w, x)
  read, config, tensors = export_one(tmp_path, result, checkpoint_format="gptq_v2")
  assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
  np.testing.assert_array_equal(read, np.asarray(result.weights).T)
  zeros = unpack_words(tensors["model.layers.0.mlp.up_proj.qzeros"].T, 4).T
  np.testing.assert_array_equal(zeros, np.asarray(result.zero_point).T)


def test_packed_layer_exports_the_same_tensors(tmp_path):
  w, x = layer_data()
  result = comq_jax.gptq(4, granularity="group", group_size=128,
                         scale_dtype=F16).quantize_layer(w, x)
  view = layers_lib.Contraction(input_axes=(1,), kernel_perm=(0, 1), kernel_shape=(256, 64),
                                num_contracted=1)
  packed = packed_layers.pack_quantized_layer(
      jax.tree.map(lambda a: a[None], result), view)
  from_result, _ = export_gptq.layer_tensors(result)
  from_packed, _ = export_gptq.layer_tensors(packed)
  for a, b in zip(from_result, from_packed, strict=True):
    np.testing.assert_array_equal(a, b)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(32)(nn.relu(nn.Dense(64)(x)))


def test_model_quantization_export_with_float_tensors_and_config(tmp_path):
  x = jax.random.normal(jax.random.key(0), (256, 128))
  model = _MLP()
  variables = model.init(jax.random.key(1), x)
  result = comq_jax.quantize_model(model, variables, [x],
                                   comq_jax.gptq(4, granularity="group", group_size=64,
                                                 scale_dtype=F16))
  names = {"Dense_0": "model.fc1", "Dense_1": "model.fc2"}
  params = variables["params"]
  floats = {"model.fc1.bias": params["Dense_0"]["bias"],
            "model.fc2.bias": params["Dense_1"]["bias"]}
  folder = str(tmp_path / "ckpt")
  quant = export_gptq.export_model_quantization(
      folder, result, names, floats, model_config={"model_type": "mlp"})
  assert quant == {"quant_method": "gptq", "bits": 4, "group_size": 64,
                   "desc_act": False, "sym": False, "checkpoint_format": "gptq",
                   "lm_head": False, "pack_dtype": "int32"}
  weights, config, tensors = read_gptq(folder)
  assert config["model_type"] == "mlp" and config["torch_dtype"] == "float16"
  assert config["quantization_config"] == quant
  with open(os.path.join(folder, "quantize_config.json")) as f:
    assert json.load(f) == quant
  quantized = result.variables["params"]
  for ours, name in names.items():
    np.testing.assert_array_equal(weights[name], np.asarray(quantized[ours]["kernel"]).T)
  assert tensors["model.fc1.bias"].dtype == np.float16
  assert set(tensors) == {f"{name}.{field}" for name in names.values()
                          for field in ("qweight", "qzeros", "scales", "g_idx", "bias")}
  with open(os.path.join(folder, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header["__metadata__"] == {"format": "pt"}  # what transformers requires


# ----------------------------------------------------------------------------- grids


def test_float16_scale_grid_values_are_scale_times_integers():
  w, _ = layer_data()
  for grid in ("asymmetric", "symmetric"):
    g = grids.make_grid(w.T, bits=4, grid=grid, granularity="group", group_size=128,
                        scale_dtype=F16)
    step = np.asarray(g.step)
    np.testing.assert_array_equal(step.astype(np.float16).astype(np.float32), step)
    t = np.arange(g.units.shape[1])[None, :] - np.asarray(g.zero_point)[:, None]
    np.testing.assert_array_equal(np.asarray(g.values()), step[:, None] * t)
    # Rounded up: the float16 grid spans at least the float32 grid's range.
    plain = grids.make_grid(w.T, bits=4, grid=grid, granularity="group", group_size=128)
    assert np.all(step >= np.asarray(plain.step))


def test_scale_dtype_is_for_uniform_grids_without_shrink():
  with pytest.raises(ValueError, match="uniform grids with scalar=1.0"):
    comq_jax.rtn(4, grid="pow2", scale_dtype=F16)
  with pytest.raises(ValueError, match="uniform grids with scalar=1.0"):
    comq_jax.comq(4, scalar=0.9, scale_dtype=F16)
  with pytest.raises(ValueError, match="scale_dtype must be None or one of"):
    comq_jax.gptq(4, scale_dtype="bfloat16")
  solver = comq_jax.comq(4, scale_dtype=F16)
  assert comq_jax.solvers.from_settings(solver.settings()) == solver


# ----------------------------------------------------------------------------- refusals


def test_pow2_grid_is_refused(tmp_path):
  w, x = layer_data()
  result = comq_jax.rtn(5, grid="pow2").quantize_layer(w, x)
  with pytest.raises(ValueError, match="pow2 grid .* uniform grids only"):
    export_one(tmp_path, result)
  assert not os.path.exists(tmp_path / "ckpt")


def test_offset_grid_is_refused_and_signed_grid_round_trips(tmp_path):
  w, x = layer_data()
  options = dict(granularity="group", group_size=32, scale_dtype=F16)
  offset = comq_jax.rtn(4, grid="offset", **options).quantize_layer(w, x)
  with pytest.raises(ValueError, match="offset grid .* no integer zero point"):
    export_one(tmp_path, offset)
  signed = comq_jax.comq(4, grid="signed", **options).quantize_layer(w, x)
  weights, config, _ = export_one(tmp_path, signed)
  assert config["quantization_config"]["sym"] is False
  np.testing.assert_array_equal(weights, np.asarray(signed.weights).T)


def test_float32_scales_are_refused_naming_the_setting(tmp_path):
  w, x = layer_data()
  result = comq_jax.rtn(4, granularity="group", group_size=128).quantize_layer(w, x)
  with pytest.raises(ValueError, match="not float16 scale .* scale_dtype='float16'"):
    export_one(tmp_path, result)


def test_zero_point_outside_the_format_range_is_refused(tmp_path):
  w, x = layer_data()
  # All weights positive: the asymmetric grid's zero point is 0 or below.
  result = comq_jax.rtn(4, scale_dtype=F16).quantize_layer(abs(w) + 0.01, x)
  with pytest.raises(ValueError, match=r"zero point -?\d+ .* outside 1\.\.16"):
    export_one(tmp_path, result)
  with pytest.raises(ValueError, match=r"outside 0\.\.15"):
    export_one(tmp_path, result, checkpoint_format="gptq_v2")


def test_unsupported_bits_and_shapes_are_refused(tmp_path):
  w, x = layer_data()
  result = comq_jax.rtn(5, scale_dtype=F16).quantize_layer(w, x)
  with pytest.raises(ValueError, match=r"holds \(2, 3, 4, 8\)-bit codes, got bits=5"):
    export_one(tmp_path, result)
  w, x = layer_data(d_in=20)
  result = comq_jax.rtn(4, scale_dtype=F16).quantize_layer(w, x)
  with pytest.raises(ValueError, match="in_features=20 is not a multiple of 8"):
    export_one(tmp_path, result)
  with pytest.raises(ValueError, match="checkpoint_format must be one of"):
    export_one(tmp_path, result, checkpoint_format="awq")


def test_layers_the_one_quantization_config_cannot_describe_are_refused(tmp_path):
  w, x = layer_data()
  by_group = {size: comq_jax.rtn(4, granularity="group", group_size=size,
                                 scale_dtype=F16).quantize_layer(w, x)
              for size in (64, 128)}
  with pytest.raises(ValueError, match="one bit width, group size and grid kind"):
    export_gptq.export_gptq(str(tmp_path / "ckpt"), {"a": by_group[64], "b": by_group[128]},
                            {})
  grouped_conv = jax.tree.map(lambda a: np.stack([a, a]), by_group[64])
  with pytest.raises(ValueError, match="2 feature groups"):
    export_gptq.layer_tensors(grouped_conv)
  assert os.listdir(tmp_path) == []  # nothing half-written


def test_existing_folder_is_replaced_whole(tmp_path):
  w, x = layer_data()
  result = comq_jax.rtn(4, scale_dtype=F16).quantize_layer(w, x)
  folder = tmp_path / "ckpt"
  folder.mkdir()
  (folder / "stale.txt").write_text("old")
  export_gptq.export_gptq(str(folder), {"m": result}, {})
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors",
                                        "quantize_config.json"]
  assert os.listdir(tmp_path) == ["ckpt"]
