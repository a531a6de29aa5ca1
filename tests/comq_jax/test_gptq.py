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
  # The same from act-order GPTQ.
  act_order = comq_jax.gptq(act_order=True, static_groups=True, **options).quantize_layer(w, x)
  comq_from_act_order = comq_jax.comq(init="gptq-act-order", **options).quantize_layer(w, x)
  assert float(comq_from_act_order.error) <= float(act_order.error) * (1 + 1e-6)


# Slow: it trains the digits CNN first. The same per-layer properties (GPTQ below RTN)
# are asserted on the official cases above and on the embedded language model's layers
# in the default suite.
@pytest.mark.integration
@pytest.mark.slow
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
  # Every input of a uniform grid is rounded by baselines._nearest_uniform. Traced
  # inside a loop over the columns of a window (and loops over the windows and the
  # blocks of a chunk), it is traced once per chunk of blocks: at most
  # baselines._CHUNKS times, whatever the number of inputs; a Python loop over the
  # inputs would trace it once per input.
  calls = []
  nearest_uniform = baselines._nearest_uniform

  def counting(*args):
    calls.append(args[3].shape)
    return nearest_uniform(*args)

  monkeypatch.setattr(baselines, "_nearest_uniform", counting)
  traces = {}
  for d_in in (96, 192):
    w, x = layer_data(5)
    w, x = np.tile(w, (d_in // D_IN, 1)), np.tile(x, (1, d_in // D_IN))
    gram = x.T @ x + np.eye(d_in, dtype=np.float32)
    calls.clear()
    # The unjitted function: the jit cache of gptq_solve would hide a second trace.
    jax.make_jaxpr(lambda w, h: baselines.gptq_solve.__wrapped__(
        w.T, h, bits=4, grid="asymmetric", granularity="channel", group_size=None,
        scalar=1.0, block_size=8, damp=0.01, act_order=False,
        static_groups=False)[0])(jnp.asarray(w), jnp.asarray(gram))
    traces[d_in] = list(calls)
  # 12 and 24 blocks of 8: the same chunks of blocks, one traced call each.
  assert traces[96] == traces[192] and len(traces[96]) == baselines._CHUNKS, traces
  assert all(shape == (D_OUT,) for shape in traces[96]), traces
  # And one compiled program serves new values of the same shapes.
  w, x = layer_data(7)
  solve = lambda w, h: comq_jax.gptq(bits=4, block_size=32).quantize_layer(w, gram=h)
  jax.block_until_ready(solve(w, x.T @ x).weights)
  with helpers.count_compilations() as compiled:
    jax.block_until_ready(solve(1.5 * w, 2.0 * x.T @ x).weights)
  assert compiled[0] == 0


@pytest.mark.parametrize("grid,scalar", [("asymmetric", 1.0), ("asymmetric", 0.8),
                                         ("symmetric", 1.0), ("symmetric", 0.7)])
@pytest.mark.parametrize("bits", [2, 4])
def test_two_level_rounding_equals_nearest(grid, scalar, bits):
  """Round-and-compare on a uniform grid picks what the argmin over all levels
  picks, on the levels, on their midpoints (ties: the lower level), one ulp
  either side of them, and outside the grid."""
  rng = np.random.default_rng(bits)
  wt = jnp.asarray(rng.normal(size=(64, 40)).astype(np.float32))
  values = grid_lib.make_grid(wt, bits=bits, grid=grid, scalar=scalar).values()
  v = np.asarray(values)
  mid = (v[:, :-1] + v[:, 1:]) / 2
  targets = np.concatenate([
      v, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf),
      np.nextafter(v, np.inf), np.nextafter(v, -np.inf), v[:, :1] - 3 * np.abs(v[:, :1]),
      v[:, -1:] + 3 * np.abs(v[:, -1:]), rng.uniform(v[:, :1], v[:, -1:], (64, 50))],
      axis=1).astype(np.float32)
  round_ = baselines._rounder(grid, values)
  for k in range(targets.shape[1]):
    code, q = round_(jnp.asarray(targets[:, k]))
    expected_code, expected_q = grid_lib.nearest(values, jnp.asarray(targets[:, k]))
    # The first minimum of the float distances, as NumPy finds it.
    first_min = np.argmin(np.abs(v - targets[:, k:k + 1]), axis=1)
    np.testing.assert_array_equal(np.asarray(code), first_min)
    np.testing.assert_array_equal(np.asarray(code), np.asarray(expected_code))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(expected_q))


def numpy_gptq(wt, gram, *, bits, group_size, damp=0.01):
  """Algorithm 1 with dynamic groups in plain float64 NumPy, one column at a time;
  grids from quant_core.grids (float32), rounding by NumPy's argmin. wt is
  (d_out, d_in); returns the codes (d_out, d_in)."""
  wt, gram = np.array(wt, np.float64), np.array(gram, np.float64)
  d_in = wt.shape[1]
  dead = np.diag(gram) == 0
  gram[dead, dead] = 1
  gram += damp * np.mean(np.diag(gram)) * np.eye(d_in)
  upper = np.linalg.cholesky(np.linalg.inv(gram)).T
  codes = np.zeros(wt.shape, np.int32)
  for i in range(d_in):
    if i % group_size == 0:
      values = np.asarray(grid_lib.make_grid(
          jnp.asarray(wt[:, i:i + group_size], jnp.float32), bits=bits,
          grid="asymmetric").values())
    target = wt[:, i].astype(np.float32)
    codes[:, i] = np.argmin(np.abs(values - target[:, None]), axis=1)
    q = values[np.arange(len(target)), codes[:, i]].astype(np.float64)
    wt[:, i:] -= np.outer((wt[:, i] - q) / upper[i, i], upper[i, i:])
  return codes


def test_codes_equal_numpy_algorithm_1_with_ragged_groups_and_padding():
  # d_in 96, groups of 40 (a last group of 16), blocks of 80: 160 inputs after
  # padding, a whole padded group among them; two blocks, so a block's error
  # reaches the next through the chunk product, and windows of 8 inside a block.
  w, x = layer_data(11)
  gram = x.astype(np.float64).T @ x.astype(np.float64)
  expected = numpy_gptq(w.T, gram, bits=3, group_size=40)
  result = comq_jax.gptq(bits=3, granularity="group", group_size=40,
                         block_size=80).quantize_layer(w, gram=gram.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(result.codes).T, expected)


@pytest.mark.parametrize("options", [
    dict(bits=4), dict(bits=3, act_order=True), dict(bits=2, block_size=32),
    dict(bits=3, granularity="group", group_size=40),
    dict(bits=4, granularity="group", group_size=32, act_order=True, static_groups=True),
    dict(bits=4, grid="pow2"), dict(bits=3, grid="symmetric", granularity="layer")])
def test_error_from_gptq_errors_equals_reconstruction_error(options):
  """The error from GPTQ's own column errors equals the error from the Gram.

  ``sum e^2 = tr(E H' E^T)`` holds exactly in exact arithmetic; in float32 the two
  differ by the rounding of the sums and of the weight updates, about 1e-6
  relative (measured: under 5e-7 here, 2.4e-7 at 4096 x 4096). 1e-5 leaves room for
  another BLAS and still fails on a missing term (the damping alone is ~1%)."""
  w, x = layer_data(12)
  x[:, [3, 50]] = 0.0  # dead inputs
  result = comq_jax.gptq(**options).quantize_layer(w, x)
  expected = comq_jax.reconstruction_error(w, np.asarray(result.weights),
                                           x.T.astype(np.float32) @ x)
  np.testing.assert_allclose(float(result.error), float(expected), rtol=1e-5)


def _gathered_shapes(jaxpr):
  """Result shapes of every gather in a jaxpr and its inner jaxprs."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "gather":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for param in eqn.params.values():
      for inner in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(inner, jax.extend.core.ClosedJaxpr):
          shapes += _gathered_shapes(inner.jaxpr)
        elif isinstance(inner, jax.extend.core.Jaxpr):
          shapes += _gathered_shapes(inner)
  return shapes


@pytest.mark.parametrize("act_order", [False, True])
def test_inputs_are_permuted_only_with_act_order(act_order):
  w, x = layer_data(13)
  gram = x.T @ x
  jaxpr = jax.make_jaxpr(lambda w, h: baselines.gptq_solve.__wrapped__(
      w.T, h, bits=4, grid="asymmetric", granularity="channel", group_size=None,
      scalar=1.0, block_size=32, damp=0.01, act_order=act_order,
      static_groups=False))(jnp.asarray(w), jnp.asarray(gram))
  # Gathers into whole matrices (weights, Gram, results); the rounding gathers two
  # levels per channel, and the diagonal of H is a vector.
  whole = [s for s in _gathered_shapes(jaxpr.jaxpr) if len(s) == 2 and D_IN in s]
  assert bool(whole) == act_order, whole


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
