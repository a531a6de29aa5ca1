"""The packed model file: round trip, and a clear error for each bad file."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from inq_jax import deploy
from inq_jax.deploy import files


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
  result = comq_jax.quantize_model(MODEL, variables, [X], bits=4, method="rtn",
                                   grid="symmetric", granularity="group", group_size=8)
  packed = deploy.pack_quantization(result, MODEL, X)
  path = str(tmp_path_factory.mktemp("packed") / "model.safetensors")
  size = files.save_packed(path, packed)
  return result, packed, path, size


def test_round_trip_runs_the_same(packed_model):
  result, packed, path, size = packed_model
  assert size == os.path.getsize(path)
  assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith(".tmp")]
  loaded = files.load_packed(path, like=result.variables)
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
  # Codes at two per byte: 64 padded rows of 3 columns for the 100 x 3 kernel, an
  # eighth of its float32 bytes (the JSON header dominates a model this small).
  start, end = tensors["params/fc/kernel.codes"]["data_offsets"]
  assert end - start == 64 * 3 < 4 * result.variables["params"]["fc"]["kernel"].size / 6


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
  with pytest.raises(ValueError, match="schema version '0'; this code reads version '1'"):
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
