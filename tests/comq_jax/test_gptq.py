"""GPTQ against an unblocked reference, against round-to-nearest, and as COMQ's start."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from comq_jax import baselines
from quant_core import grids as grid_lib
from experiments import input_pipeline
from experiments import models
from experiments import train
from tests import helpers
from tests.experiments import test_comq_experiments

D_IN, D_OUT, N = 96, 24, 384


def layer_data(seed):
  """Anisotropic inputs with some non-zero means (as the official COMQ cases)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D_IN)) * rng.uniform(0.2, 3.0, D_IN)
  x[:, rng.choice(D_IN, 4, replace=False)] += rng.uniform(-2.5, 2.5, 4)
  w = 0.05 * rng.normal(size=(D_IN, D_OUT))
  return w.astype(np.float32), x.astype(np.float32)


def unblocked_gptq(w, gram, *, bits, group_size, act_order, static_groups,
                   damp=0.01):
  """Algorithm 1 of the GPTQ paper as written: one input at a time, every later
  input updated at once, in float64; grids and rounding from quant_core.grids.

  Returns the quantized weights and their codes, both (d_in, d_out).
  """
  wt = np.asarray(w, np.float64).T.copy()
  d_out, d_in = wt.shape
  gram = np.asarray(gram, np.float64).copy()
  options = dict(bits=bits, grid="asymmetric", scalar=1.0)
  as_f32 = lambda a: jnp.asarray(a, jnp.float32)
  static = grid_lib.make_grid(
      as_f32(wt), granularity="group" if group_size else "channel",
      group_size=group_size, **options).values()
  groups = grid_lib.num_groups(d_in, group_size)
  static = np.asarray(static).reshape(d_out, groups, -1)
  perm = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(d_in)
  wt, gram = wt[:, perm], gram[perm][:, perm]
  dead = np.diag(gram) == 0
  gram[dead, dead] = 1
  gram += damp * np.mean(np.diag(gram)) * np.eye(d_in)
  upper = np.linalg.cholesky(np.linalg.inv(gram)).T
  q = np.zeros_like(wt)
  codes = np.zeros(wt.shape, np.int32)
  for i in range(d_in):
    if group_size and not static_groups:
      if i % group_size == 0:
        span = wt[:, i:i + group_size]
        values = np.asarray(grid_lib.make_grid(as_f32(span), granularity="channel",
                                               **options).values())
    else:
      values = static[:, perm[i] // group_size if group_size else 0]
    code, q_i = grid_lib.nearest(as_f32(values), as_f32(wt[:, i]))
    q[:, i], codes[:, i] = np.asarray(q_i), np.asarray(code)
    error = (wt[:, i] - q[:, i]) / upper[i, i]
    wt[:, i:] -= np.outer(error, upper[i, i:])
  inverse = np.argsort(perm)
  return q[:, inverse].T, codes[:, inverse].T


CASES = [  # (group_size, act_order, static_groups)
    (None, False, False), (None, True, False), (32, False, False), (32, False, True),
    (32, True, True), (40, False, False)]  # 40: a ragged last group of 16 inputs


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,act_order,static_groups", CASES)
def test_blocked_equals_unblocked_reference(bits, group_size, act_order, static_groups):
  w, x = layer_data(bits)
  gram = x.astype(np.float64).T @ x.astype(np.float64)
  reference, reference_codes = unblocked_gptq(
      w, gram, bits=bits, group_size=group_size, act_order=act_order,
      static_groups=static_groups)
  granularity = "group" if group_size else "channel"
  # 1: the unblocked schedule; 32: three blocks (40 with groups of 40: the last
  # block padded). test_block_size_changes_nothing covers one block of 128.
  for block_size in (1, 32):
    solver = comq_jax.gptq(bits=bits, granularity=granularity, group_size=group_size,
                           act_order=act_order, static_groups=static_groups,
                           block_size=block_size)
    result = solver.quantize_layer(w, gram=gram.astype(np.float32))
    # Blocked float32 against unblocked float64: the same codes in every case here
    # (measured). Another seed could meet a weight within float32 rounding of a grid
    # midpoint, which may round the other way.
    np.testing.assert_array_equal(np.asarray(result.codes), reference_codes)
    if group_size and not static_groups:
      # Each group's grid comes from the updated weights, float32 here against the
      # reference's float64: the grid values agree to a few ulps.
      np.testing.assert_allclose(np.asarray(result.weights), reference, rtol=1e-5,
                                 atol=1e-7)
    else:
      np.testing.assert_array_equal(np.asarray(result.weights),
                                    reference.astype(np.float32))


def test_block_size_changes_nothing():
  w, x = layer_data(7)
  one, many = (comq_jax.gptq(bits=3, block_size=b).quantize_layer(w, x) for b in (1, 128))
  np.testing.assert_array_equal(np.asarray(one.codes), np.asarray(many.codes))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,granularity,group_size", [
    (4, "channel", None), (3, "channel", None), (2, "channel", None), (3, "group", 32)])
def test_gptq_beats_round_to_nearest_and_comq_from_gptq_beats_gptq(
    seed, bits, granularity, group_size):
  w, x = layer_data(10 + seed)
  options = dict(bits=bits, granularity=granularity, group_size=group_size)
  rtn = comq_jax.rtn(**options).quantize_layer(w, x)
  gptq = comq_jax.gptq(static_groups=True, **options).quantize_layer(w, x)
  comq_from_gptq = comq_jax.comq(init="gptq", **options).quantize_layer(w, x)
  assert float(gptq.error) < float(rtn.error)
  assert float(comq_from_gptq.error) <= float(gptq.error) * (1 + 1e-6)
  assert np.all(np.diff(np.asarray(comq_from_gptq.history)) <= 1e-6 * float(rtn.error))


@pytest.mark.integration
def test_on_the_trained_digits_cnn_every_layer(tmp_path):
  """Per layer of a trained digits CNN: GPTQ < RTN, and COMQ from GPTQ <= GPTQ."""
  train.train_and_evaluate(test_comq_experiments.tiny_config("fp"), str(tmp_path))
  params, batch_stats = test_comq_experiments.final_params(str(tmp_path))
  variables = {"params": params, "batch_stats": batch_stats}
  data = input_pipeline.DigitsData(test_size=0.25, split_seed=0)
  images = [data.train_images[start:start + 64] for start in (0, 64)]
  model = models.create_model("SmallCNN", 10)
  for bits in (4, 2):
    gptq = comq_jax.quantize_model(model, variables, images, comq_jax.gptq(bits=bits),
                                   train=False).layers
    comq = comq_jax.quantize_model(model, variables, images, comq_jax.comq(bits=bits, init="gptq"),
                                   train=False).layers
    for g, c in zip(gptq, comq, strict=True):
      assert g.error < g.rtn_error, g
      assert c.error <= g.error * (1 + 1e-6), (c, g)


def test_dead_inputs_are_rounded_to_nearest():
  w, x = layer_data(3)
  x[:, [5, 17]] = 0.0
  result = comq_jax.gptq(bits=3).quantize_layer(w, x)
  rtn = comq_jax.rtn(bits=3).quantize_layer(w)
  np.testing.assert_array_equal(np.asarray(result.weights)[[5, 17]],
                                np.asarray(rtn.weights)[[5, 17]])
  assert np.all(np.isfinite(np.asarray(result.weights)))


def test_dynamic_group_grids_are_reported_with_their_codes():
  w, x = layer_data(4)
  result = comq_jax.gptq(bits=3, granularity="group", group_size=40).quantize_layer(w, x)
  assert result.group_size == 40 and result.levels.shape == (D_OUT, 3, 8)
  group = np.minimum(np.arange(D_IN) // 40, 2)
  rebuilt = np.asarray(result.levels)[np.arange(D_OUT)[None, :], group[:, None],
                                      np.asarray(result.codes)]
  np.testing.assert_array_equal(rebuilt, np.asarray(result.weights))
  assert np.asarray(result.scale).shape == (D_OUT, 3)


def test_jitted_without_python_loop_over_inputs(monkeypatch):
  # Every input is rounded by grid_lib.nearest. Traced inside a loop over the inputs
  # of a block (and a scan over the blocks), it is traced a fixed number of times,
  # whatever the number of inputs; a Python loop would trace it once per input.
  calls = []
  nearest = grid_lib.nearest

  def counting_nearest(values, target):
    calls.append(target.shape)
    return nearest(values, target)

  monkeypatch.setattr(grid_lib, "nearest", counting_nearest)
  traces = {}
  for d_in in (96, 192):
    w, x = layer_data(5)
    w, x = np.tile(w, (d_in // D_IN, 1)), np.tile(x, (1, d_in // D_IN))
    gram = x.T @ x + np.eye(d_in, dtype=np.float32)
    calls.clear()
    # The unjitted function: the jit cache of gptq_solve would hide a second trace.
    jax.make_jaxpr(lambda w, h: baselines.gptq_solve.__wrapped__(
        w.T, h, bits=4, grid="asymmetric", granularity="channel", group_size=None,
        scalar=1.0, block_size=32, damp=0.01, act_order=False,
        static_groups=False)[0])(jnp.asarray(w), jnp.asarray(gram))
    traces[d_in] = list(calls)
  # One input of all 24 channels per traced call, the same few calls at 3 and 6 blocks.
  assert traces[96] == traces[192] and 1 <= len(traces[96]) <= 2, traces
  assert all(shape == (D_OUT,) for shape in traces[96]), traces
  # And one compiled program serves new values of the same shapes.
  w, x = layer_data(7)
  solve = lambda w, h: comq_jax.gptq(bits=4, block_size=32).quantize_layer(w, gram=h)
  jax.block_until_ready(solve(w, x.T @ x).weights)
  with helpers.count_compilations() as compiled:
    jax.block_until_ready(solve(1.5 * w, 2.0 * x.T @ x).weights)
  assert compiled[0] == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"damp": 0.0}, "damp must be a number in \\(0, 1\\)"),
    ({"damp": 1.0}, "damp must be a number in \\(0, 1\\)"),
    ({"block_size": 0}, "block_size must be an integer >= 1"),
    ({"granularity": "group", "group_size": 32, "act_order": True},
     "act_order with granularity='group' needs static_groups=True"),
    ({"granularity": "group", "group_size": 0}, "group_size, an integer >= 1"),
])
def test_bad_options_raise(kwargs, message):
  w, x = layer_data(6)
  with pytest.raises(ValueError, match=message):
    comq_jax.gptq(bits=4, **kwargs).quantize_layer(w, x)


def test_non_positive_definite_gram_raises():
  w, _ = layer_data(6)
  indefinite = np.eye(D_IN, dtype=np.float32)
  indefinite[0, 1] = indefinite[1, 0] = 3.0  # eigenvalues 4 and -2
  with pytest.raises(ValueError, match="not positive definite after damping"):
    comq_jax.gptq(bits=4).quantize_layer(w, gram=indefinite)
  # COMQ started from GPTQ falls back to the float start instead.
  start_float = comq_jax.comq(bits=4, order="cyclic").quantize_layer(w, gram=indefinite)
  start_gptq = comq_jax.comq(bits=4, order="cyclic", init="gptq").quantize_layer(w, gram=indefinite)
  np.testing.assert_array_equal(np.asarray(start_float.weights),
                                np.asarray(start_gptq.weights))


def test_nan_inputs_raise_as_in_comq():
  w, x = layer_data(6)
  x[3, 3] = np.nan
  with pytest.raises(ValueError, match="x contains NaN or inf"):
    comq_jax.gptq(bits=4).quantize_layer(w, x)


def test_official_cases_gptq_beats_rtn():
  """On the official COMQ reference cases: GPTQ below RTN on the same grid."""
  data = np.load(helpers.reference_file("comq_official_synthetic.npz"))
  for k in range(int(data["n_cases"])):
    bits = int(data[f"case{k}_params"][0])
    w, x = data[f"case{k}_W"], data[f"case{k}_X"]
    rtn = comq_jax.rtn(bits=bits).quantize_layer(w, x)
    assert float(comq_jax.gptq(bits=bits).quantize_layer(w, x).error) < float(rtn.error), k
