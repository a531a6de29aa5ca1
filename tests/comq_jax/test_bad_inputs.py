"""Bad inputs a careless user gives: each is refused with an error that says what was
wrong and what is allowed, before any work (and nothing half-written on disk)."""

import os
import stat

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from quant_core import deploy

SOLVERS = {"comq": comq_jax.comq(bits=4), "rtn": comq_jax.rtn(bits=4),
           "gptq": comq_jax.gptq(bits=4)}


class MLP(nn.Module):
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x)))


def _batches(count=3, width=64):
  return [np.random.default_rng(i).normal(size=(16, width)).astype(np.float32)
          for i in range(count)]


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 64)))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_data_is_refused_before_any_solve(mlp, solver, value):
  batches = _batches()
  batches[1][3, 5] = value
  # Dense_1 (the hidden layer, made second) is the first one called.
  with pytest.raises(ValueError, match=r"calibration batch 1 has 1 non-finite values "
                     r"\(NaN or inf\) at batch \(the inputs of Dense_1"):
    comq_jax.quantize_model(*mlp, batches, SOLVERS[solver])


def test_a_batch_of_the_wrong_width_names_the_batch_and_both_widths(mlp):
  with pytest.raises(ValueError, match=r"calibration batch 0 has shape \(16, 48\), which "
                     r"does not fit the model: Dense_1: .*expected 64 input features, "
                     r"got 48") as raised:
    comq_jax.quantize_model(*mlp, _batches(width=48), comq_jax.comq(bits=4))
  assert "skip" not in str(raised.value)  # no advice to leave the layer in float


def test_a_later_batch_of_another_shape_is_named(mlp):
  batches = _batches()
  batches[2] = batches[2][:, :40]
  with pytest.raises(ValueError, match=r"calibration batch 2 has shape \(16, 40\).*"
                     r"expected 64 input features, got 40"):
    comq_jax.quantize_model(*mlp, batches, comq_jax.comq(bits=4))


def test_batches_of_another_pytree_are_named(mlp):
  batches = [_batches()[0], {"x": _batches()[1]}]
  with pytest.raises(ValueError, match="calibration batch 1 has structure"):
    comq_jax.quantize_model(*mlp, batches, comq_jax.comq(bits=4))


@pytest.fixture(scope="module")
def packed_mlp(mlp):
  model, variables = mlp
  result = comq_jax.quantize_model(model, variables, _batches(1), comq_jax.comq(bits=4))
  return model, result, deploy.pack_quantization(result)


def test_packed_variables_of_another_model_are_refused(packed_mlp, tmp_path):
  _, _, packed = packed_mlp
  path = str(tmp_path / "mlp.safetensors")
  deploy.save_packed(path, packed)
  loaded = deploy.load_packed(path)  # no like=: the file alone
  x = jnp.ones((2, 64))
  with pytest.raises(ValueError, match=r"do not fit this module: .*params/Dense_1/kernel "
                     r"is \(64, 32\) in the packed variables, the module's is \(64, 16\)"):
    deploy.packed_apply(MLP(hidden=16), loaded, x, interpret=True)


def test_packed_apply_names_the_expected_input_width(packed_mlp):
  model, _, packed = packed_mlp
  with pytest.raises(ValueError, match="expected 64 input features, got 48"):
    deploy.packed_apply(model, packed, jnp.ones((2, 48)), interpret=True)


def test_load_packed_accepts_packed_variables_and_a_module_as_like(packed_mlp, tmp_path):
  _, result, packed = packed_mlp
  path = str(tmp_path / "mlp.safetensors")
  deploy.save_packed(path, packed)
  for like in (packed, result.variables):
    loaded = deploy.load_packed(path, like=like)
    assert jax.tree.structure(loaded, is_leaf=deploy.PackedLayer.__instancecheck__) == (
        jax.tree.structure(packed, is_leaf=deploy.PackedLayer.__instancecheck__))
  other = MLP(hidden=16).init(jax.random.key(0), jnp.zeros((1, 64)))
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel has shape \(32, 10\), the "
                     r"model's is \(16, 10\)"):
    deploy.load_packed(path, like=other)


class Tiny(nnx.Module):

  def __init__(self, rngs):
    self.first = nnx.Linear(16, 8, rngs=rngs)
    self.second = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.second(nnx.relu(self.first(x)))


def test_load_packed_takes_an_nnx_module_as_like(tmp_path):
  model = Tiny(nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  packed = deploy.pack_quantization(
      comq_jax.quantize_model(model, None, [x], comq_jax.comq(bits=4)))
  path = str(tmp_path / "tiny.safetensors")
  deploy.save_packed(path, packed)
  loaded = deploy.load_packed(path, like=model)
  np.testing.assert_allclose(deploy.packed_apply(model, loaded, x, interpret=True),
                             deploy.packed_apply(model, packed, x, interpret=True))
  other_tree = {"params": {"other": {"kernel": jnp.zeros((16, 8))}}}
  with pytest.raises(ValueError, match="does not hold this model's layer tree"):
    deploy.load_packed(path, like=other_tree)


def test_save_packed_into_a_missing_folder_names_the_target(packed_mlp, tmp_path):
  target = tmp_path / "missing" / "model.safetensors"
  with pytest.raises(FileNotFoundError, match=f"cannot write {target}: the folder"):
    deploy.save_packed(str(target), packed_mlp[2])
  assert not (tmp_path / "missing").exists()


def test_packed_files_get_the_mode_of_new_files_under_the_umask(packed_mlp, tmp_path):
  old = os.umask(0o022)
  try:
    path = tmp_path / "model.safetensors"
    deploy.save_packed(str(path), packed_mlp[2])
    other = tmp_path / "other.txt"
    other.write_text("x")
  finally:
    os.umask(old)
  assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(other.stat().st_mode) == 0o644
  assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


class TiedLM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(50, 32)
    return embed.attend(nn.Dense(32)(embed(tokens)))


class TiedNNX(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(50, 32, rngs=rngs)
    self.hidden = nnx.Linear(32, 32, rngs=rngs)

  def __call__(self, tokens):
    return self.embed.attend(self.hidden(self.embed(tokens)))


def test_a_tied_head_is_listed_as_a_skipped_embedding():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 8)))
  linen = TiedLM()
  cases = [(linen, linen.init(jax.random.key(0), tokens), "Embed_0", "Dense_0"),
           (TiedNNX(nnx.Rngs(0)), None, "embed", "hidden")]
  for model, variables, embedding, dense in cases:
    result = comq_jax.quantize_model(model, variables, [tokens], comq_jax.comq(bits=4))
    assert [layer.path for layer in result.layers] == [dense]
    assert [tuple(s) for s in result.skipped] == [
        (embedding, "embedding", "tied to the embedding table")]


def test_a_group_larger_than_the_layer_is_recorded_as_used(mlp):
  solver = comq_jax.comq(bits=4, granularity="group", group_size=128)
  result = comq_jax.quantize_model(*mlp, _batches(1), solver)
  used = {layer.path: layer.record()["group_size"] for layer in result.layers}
  assert used == {"Dense_1": 64, "Dense_0": 32}  # d_in of each layer: one group


# --- the wider pass: other entry points a careless user reaches -----------------------


def test_one_array_instead_of_a_list_of_batches_is_refused(mlp):
  with pytest.raises(ValueError, match=r"a sequence of batches, got one array of shape "
                     r"\(16, 64\).*pass \[batch\]"):
    comq_jax.quantize_model(*mlp, _batches()[0], comq_jax.comq(bits=4))


def test_a_scalar_batch_is_named_as_not_fitting(mlp):
  with pytest.raises(ValueError, match=r"calibration batch 0 has shape \(\), which does not "
                     r"fit the model: Dense_1: axis -1 is out of range"):
    comq_jax.quantize_model(*mlp, [np.float32(1.0)], comq_jax.comq(bits=4))


def test_a_linen_model_without_variables_or_a_non_model_is_refused(mlp):
  model, variables = mlp
  with pytest.raises(ValueError, match="variables=None is for an nnx.Module"):
    comq_jax.quantize_model(model, None, _batches(1), comq_jax.comq(bits=4))
  with pytest.raises(ValueError, match="the model must be a linen Module.*got str"):
    comq_jax.quantize_model("mlp", variables, _batches(1), comq_jax.comq(bits=4))


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_layer_solve_without_rows_is_refused(solver):
  w = np.ones((16, 8), np.float32)
  with pytest.raises(ValueError, match="x has no rows"):
    SOLVERS[solver].quantize_layer(w, np.zeros((0, 16), np.float32))


def test_save_packed_refuses_a_folder_and_a_non_dict_writing_nothing(packed_mlp, tmp_path):
  with pytest.raises(IsADirectoryError, match="it is a folder; give a file name"):
    deploy.save_packed(str(tmp_path), packed_mlp[2])
  with pytest.raises(ValueError, match="must be a dict of variables.*got int"):
    deploy.save_packed(str(tmp_path / "x.safetensors"), 3)
  assert list(tmp_path.iterdir()) == [] and not list(tmp_path.parent.glob("*.tmp"))


def test_pack_quantization_names_what_it_takes(mlp):
  with pytest.raises(ValueError, match="takes what comq_jax.quantize_model returns"):
    deploy.pack_quantization(mlp[1])


def test_packed_apply_on_float_variables_says_nothing_is_packed(mlp, caplog):
  model, variables = mlp
  with caplog.at_level("WARNING", logger="quant_core.deploy.inference"):
    deploy.packed_apply(model, variables, jnp.ones((2, 64)))
  assert "hold no packed kernel; the model runs in float" in caplog.text


def test_non_finite_data_is_refused_with_sequential_inputs_too(mlp):
  batches = _batches()
  batches[2][0, 0] = np.nan
  with pytest.raises(ValueError, match="calibration batch 2 has 1 non-finite values"):
    comq_jax.quantize_model(*mlp, batches, comq_jax.comq(bits=4), inputs="sequential")
