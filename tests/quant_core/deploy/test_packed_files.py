"""The packed model file: round trip, and a clear error for each bad file."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import inq_jax
from quant_core import deploy
from quant_core.deploy import files


class _Net(nn.Module):
  """A depthwise conv, batch norm (a batch_stats collection) and a Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(x)
    x = nn.BatchNorm(use_running_average=True, name="norm")(x)
    return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


MODEL = _Net()
X = jax.random.normal(jax.random.key(0), (2, 5, 5, 4), jnp.float32)


@pytest.fixture(scope="module")
def packed_model(tmp_path_factory):
  variables = MODEL.init(jax.random.key(1), X)
  solver = comq_jax.rtn(bits=4, grid="symmetric", granularity="group", group_size=8)
  result = comq_jax.quantize_model(MODEL, variables, [X], solver)
  packed = deploy.pack_quantization(result)
  path = str(tmp_path_factory.mktemp("packed") / "model.safetensors")
  size = files.save_packed(path, packed)
  return result, packed, path, size


def test_round_trip_runs_the_same(packed_model):
  result, packed, path, size = packed_model
  assert size == os.path.getsize(path)
  assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith(".tmp")]
  loaded = files.load_packed(path, like=result.variables)
  for name in ("depthwise", "fc"):
    saved, read = packed["params"][name]["kernel"], loaded["params"][name]["kernel"]
    assert isinstance(read, deploy.PackedLayer)
    assert (read.kernel_shape, read.kernel_perm, read.dtype, read.groups) == (
        saved.kernel_shape, saved.kernel_perm, saved.dtype, saved.groups)
  # The file gives back the quantized float variables exactly.
  restored = deploy.unpack(loaded)
  assert jax.tree.structure(restored) == jax.tree.structure(result.variables)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(result.variables),
                       strict=True):
    assert np.asarray(got).dtype == np.asarray(want).dtype
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  expected = deploy.packed_apply(MODEL, packed, X)
  np.testing.assert_array_equal(deploy.packed_apply(MODEL, loaded, X), expected)
  np.testing.assert_allclose(expected, MODEL.apply(result.variables, X), rtol=1e-5,
                             atol=1e-6)


def test_file_holds_codes_not_float_kernels(packed_model):
  result, _, path, _ = packed_model
  with open(path, "rb") as f:
    data = f.read()
  header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
  tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
  assert "params/fc/kernel" not in tensors
  assert tensors["params/fc/kernel.codes"]["dtype"] == "U8"
  assert {"batch_stats/norm/mean", "params/fc/bias"} <= set(tensors)
  leaves = json.loads(header["__metadata__"]["leaves"])
  fc = next(entry for entry in leaves if entry["path"] == ["params", "fc", "kernel"])
  assert (fc["bits"], fc["grid"], fc["group_size"], fc["layout"]) == (
      4, "symmetric", 8, "nibbles_split_halves")
  # Each kernel is a PackedLayer: its view's matrices, the contraction's kernel axis
  # order (None for a conv) and the float kernel's dtype.
  assert (fc["form"], fc["groups"], fc["kernel_shape"], fc["kernel_perm"], fc["dtype"]) == (
      "layer", 1, [100, 3], [0, 1], "float32")
  depthwise = next(entry for entry in leaves
                   if entry["path"] == ["params", "depthwise", "kernel"])
  assert (depthwise["form"], depthwise["groups"], depthwise["shape"],
          depthwise["kernel_shape"], depthwise["kernel_perm"], depthwise["dtype"]) == (
      "layer", 4, [9, 1], [3, 3, 1, 4], None, "float32")
  assert header["__metadata__"]["format"] == files.FORMAT == "quant_core.packed"
  # Codes at two per byte: 64 padded rows of 3 columns for the 100 x 3 kernel, an
  # eighth of its float32 bytes (the JSON header dominates a model this small).
  start, end = tensors["params/fc/kernel.codes"]["data_offsets"]
  assert end - start == 64 * 3 < 4 * result.variables["params"]["fc"]["kernel"].size / 6


def test_inq_packed_model_round_trips(tmp_path):
  # inq_jax.pack_model's PackedLayer kernels (power-of-two codes under each layer's n1)
  # through the file: the same packed tree, the same outputs, the exact float tree.
  variables = MODEL.init(jax.random.key(1), X)
  quantizer = inq_jax.inq(5)
  params, state = quantizer.step(variables["params"], quantizer.init(variables["params"]),
                                 1.0)
  quantized = dict(variables, params=params)
  packed = inq_jax.pack_model(MODEL, quantized, state, X)
  path = str(tmp_path / "inq.safetensors")
  files.save_packed(path, packed)
  loaded = files.load_packed(path, like=quantized)
  for name in ("depthwise", "fc"):
    saved, read = packed["params"][name]["kernel"], loaded["params"][name]["kernel"]
    assert isinstance(read, deploy.PackedLayer)
    assert isinstance(read.matrices, deploy.PackedPow2)
    assert (read.kernel_shape, read.kernel_perm, read.dtype, read.groups) == (
        saved.kernel_shape, saved.kernel_perm, saved.dtype, saved.groups)
    np.testing.assert_array_equal(read.matrices.n1, saved.matrices.n1)
    np.testing.assert_array_equal(read.matrices.data, saved.matrices.data)
  np.testing.assert_array_equal(deploy.packed_apply(MODEL, loaded, X),
                                deploy.packed_apply(MODEL, packed, X))
  restored = deploy.unpack(loaded)
  assert jax.tree.structure(restored) == jax.tree.structure(quantized)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(quantized), strict=True):
    assert np.asarray(got).dtype == np.asarray(want).dtype
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def test_truncated_file_raises(packed_model, tmp_path):
  _, _, path, _ = packed_model
  with open(path, "rb") as f:
    data = f.read()
  for cut in (len(data) - 7, 20):
    truncated = tmp_path / f"cut{cut}.safetensors"
    truncated.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated or corrupt"):
      files.load_packed(str(truncated))


def test_other_schema_version_raises(packed_model, tmp_path, monkeypatch):
  _, packed, _, _ = packed_model
  monkeypatch.setattr(files, "FORMAT_VERSION", "0")
  old = str(tmp_path / "old.safetensors")
  files.save_packed(old, packed)
  monkeypatch.undo()
  with pytest.raises(ValueError, match="schema version '0'; this code reads version '2'"):
    files.load_packed(old)


def test_layer_tree_mismatch_raises(packed_model):
  result, _, path, _ = packed_model
  other = dict(result.variables, params={
      **result.variables["params"], "head": {"kernel": jnp.zeros((3, 2))}})
  with pytest.raises(ValueError, match=r"missing \['params/head/kernel'\]"):
    files.load_packed(path, like=other)
  wider = jax.tree.map(lambda leaf: leaf, result.variables)
  wider["params"]["fc"]["kernel"] = jnp.zeros((100, 4))
  with pytest.raises(ValueError, match=r"params/fc/kernel has shape \(100, 3\)|"
                     r"params/fc/kernel has shape \(\d+, 3\), the model's is \(100, 4\)"):
    files.load_packed(path, like=wider)
