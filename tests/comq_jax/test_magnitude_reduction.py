"""MagR: against a float64 NumPy reference of the same proximal iteration, the
optimality conditions of its problem, its l1-ball projection on hand cases, its
effect before round-to-nearest, and its refusals of bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from comq_jax.magnitude_reduction import project_l1_ball
from comq_jax.magnitude_reduction import prox_linf

D_IN, D_OUT, N = 24, 5, 96


def correlated_layer(seed, *, d_in=D_IN, d_out=D_OUT, n=N, rank=10, noise=0.05):
  """Inputs close to rank ``rank`` (a nearly singular Gram, as layer inputs of
  trained models have) and weights of the usual ``~1e-2`` scale."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d_in))
  x += noise * rng.normal(size=(n, d_in))
  w = 0.02 * rng.normal(size=(d_in, d_out))
  return w.astype(np.float32), x.astype(np.float32)


def gram_of(x):
  x = np.asarray(x, np.float64)
  return (x.T @ x).astype(np.float32)


def reference_l1_projection(v, radius=1.0):
  """Projection onto the l1 ball by Michelot's active-set iteration (no sorting):
  the threshold of the active entries, dropping those under it until none drop."""
  a = np.abs(v)
  if a.sum() <= radius:
    return v.copy()
  active = np.ones(a.shape, bool)
  while True:
    theta = (a[active].sum() - radius) / active.sum()
    keep = active & (a > theta)
    if np.array_equal(keep, active):
      return np.sign(v) * np.maximum(a - theta, 0.0)
    active = keep


def reference_magr(w0, gram, alpha, iters, group_size=None):
  """The MagR iteration, one channel (column) at a time, in float64:
  ``w <- prox_{alpha ||.||_inf}(w - H_hat (w - w0))`` with ``H_hat = H / lambda_max``
  and the prox from the Moreau decomposition; with ``group_size``, the prox of
  each group of consecutive inputs on its own (a last group takes the rest)."""
  w0 = np.asarray(w0, np.float64)
  gram = np.asarray(gram, np.float64)
  h = gram / np.linalg.eigvalsh(gram)[-1]
  w = w0.copy()
  step = group_size or w.shape[0]
  for _ in range(iters):
    v = w - h @ (w - w0)
    for j in range(w.shape[1]):
      for start in range(0, w.shape[0], step):
        part = v[start:start + step, j]
        w[start:start + step, j] = part - alpha * reference_l1_projection(part / alpha)
  return w


def normalized_objective(w, w0, gram, alpha):
  """Per channel: ``1/2 (w - w0)^T H_hat (w - w0) + alpha ||w||_inf``."""
  gram = np.asarray(gram, np.float64)
  h = gram / np.linalg.eigvalsh(gram)[-1]
  d = np.asarray(w, np.float64) - w0
  return 0.5 * np.sum(d * (h @ d), axis=0) + alpha * np.abs(w).max(axis=0)


@pytest.mark.parametrize("alpha", [1e-3, 1e-2])
def test_matches_the_float64_reference_iteration(alpha):
  w, x = correlated_layer(0)
  gram = gram_of(x)
  got = np.asarray(comq_jax.magr(w, gram, alpha=alpha))
  expected = reference_magr(w, gram, alpha, 200)
  assert got.dtype == np.float32 and got.shape == w.shape
  # The iteration really moved the weights, by far more than the tolerance.
  assert np.abs(expected - w).max() > 1e-3
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-7)


@pytest.mark.parametrize("group_size", [8, 10])  # 24 inputs: 3 groups, or 10 + 10 + 4
def test_per_group_matches_the_float64_reference_iteration(group_size):
  w, x = correlated_layer(9)
  gram = gram_of(x)
  got = np.asarray(comq_jax.magr(w, gram, alpha=1e-4, group_size=group_size))
  expected = reference_magr(w, gram, 1e-4, 200, group_size)
  assert np.abs(expected - w).max() > 1e-4
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-7)
  # Each group's largest magnitude falls, not only the channel's.
  starts = range(0, D_IN, group_size)
  top = lambda a: np.stack([np.abs(a[s:s + group_size]).max(axis=0) for s in starts])
  assert np.all(top(got) < top(w))


def test_lowers_every_channel_maximum_and_keeps_the_output():
  w, x = correlated_layer(1)
  gram = gram_of(x)
  alpha = 1e-3
  got = np.asarray(comq_jax.magr(w, gram, alpha=alpha), np.float64)
  before, after = np.abs(w).max(axis=0), np.abs(got).max(axis=0)
  assert np.all(after < 0.75 * before), (before, after)
  # Proximal gradient with step 1/L never increases the objective it minimises.
  assert np.all(normalized_objective(got, w, gram, alpha)
                < normalized_objective(w, w, gram, alpha))
  xd = np.asarray(x, np.float64)
  moved = 0.5 * np.sum((xd @ (got - w)) ** 2)
  assert moved < 1e-3 * np.sum((xd @ w) ** 2), moved


def test_converged_weights_satisfy_the_optimality_conditions():
  # Well-conditioned inputs, so that 400 steps converge to the minimiser w*:
  # 0 in H_hat (w* - w0) + alpha * d||w*||_inf, i.e. g = -H_hat (w* - w0) / alpha
  # has l1 norm 1, vanishes off the entries of largest magnitude and has their signs.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(N, D_IN)).astype(np.float32)
  w = (0.02 * rng.normal(size=(D_IN, D_OUT))).astype(np.float32)
  gram = gram_of(x)
  alpha = 1e-3
  got = np.asarray(comq_jax.magr(w, gram, alpha=alpha, iters=400), np.float64)
  h = gram.astype(np.float64) / np.linalg.eigvalsh(gram.astype(np.float64))[-1]
  g = -h @ (got - w) / alpha
  top = np.abs(got).max(axis=0)
  at_top = np.abs(got) >= top * (1 - 1e-5)
  np.testing.assert_allclose(np.abs(g).sum(axis=0), 1.0, atol=1e-4)
  assert np.abs(g[~at_top]).max() < 1e-4
  assert np.all((g * np.sign(got))[at_top] > -1e-3)


def test_alpha_zero_returns_the_weights():
  w, x = correlated_layer(3)
  np.testing.assert_array_equal(comq_jax.magr(w, gram_of(x), alpha=0.0), w)


def test_keeps_dtype_and_runs_under_jit_with_a_traced_alpha():
  w, x = correlated_layer(4)
  gram = gram_of(x)
  eager = comq_jax.magr(w, gram, alpha=2e-3, iters=50)
  traced = jax.jit(functools.partial(comq_jax.magr, iters=50))(w, gram, alpha=2e-3)
  np.testing.assert_allclose(traced, eager, rtol=0, atol=1e-7)
  half = comq_jax.magr(jnp.asarray(w, jnp.bfloat16), gram, iters=50)
  assert half.dtype == jnp.bfloat16 and half.shape == w.shape


@pytest.mark.parametrize("v, radius, expected", [
    ([0.2, -0.3, 0.1], 1.0, [0.2, -0.3, 0.1]),  # inside: unchanged
    ([0.5, -0.5, 0.0], 1.0, [0.5, -0.5, 0.0]),  # on the sphere: unchanged
    ([0.0, 0.0, 0.0], 1.0, [0.0, 0.0, 0.0]),
    ([3.0, -1.0, 0.0], 1.0, [1.0, 0.0, 0.0]),  # threshold 2
    ([0.8, -0.6, 0.1], 1.0, [0.6, -0.4, 0.0]),  # threshold 0.2
    ([3.0, 1.0, -0.5], 2.0, [2.0, 0.0, 0.0]),  # threshold 1
    ([1.0, -1.0, 1.0], 1.5, [0.5, -0.5, 0.5]),  # ties: threshold 0.5
])
def test_l1_ball_projection_hand_cases(v, radius, expected):
  got = project_l1_ball(jnp.asarray(v, jnp.float32), radius)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_l1_ball_projection_of_rows_matches_the_reference():
  v = np.random.default_rng(5).normal(size=(6, 9)) * np.array([[0.05], [0.3], [1], [2], [5],
                                                               [20]])
  got = np.asarray(project_l1_ball(jnp.asarray(v, jnp.float32)))
  expected = np.stack([reference_l1_projection(row) for row in v])
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  outside = np.abs(v).sum(axis=1) > 1
  np.testing.assert_allclose(np.abs(got[outside]).sum(axis=1), 1.0, rtol=1e-5)


def test_linf_prox_clips_the_largest_entries_by_t_in_total():
  v = jnp.asarray([[2.0, -2.0, 0.5], [3.0, -1.0, 0.0]], jnp.float32)
  np.testing.assert_allclose(prox_linf(v, jnp.float32(1.0)),
                             [[1.5, -1.5, 0.5], [2.0, -1.0, 0.0]], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(prox_linf(v, jnp.float32(0.0)), v)


def test_lowers_the_round_to_nearest_error_of_a_layer_with_outliers():
  w, x = correlated_layer(6, d_in=64, d_out=8, n=256, rank=16, noise=0.02)
  rng = np.random.default_rng(7)
  rows = rng.choice(64, size=8, replace=False)
  w[rows, np.arange(8)] = rng.choice([-1.0, 1.0], size=8) * 0.15  # one outlier a channel
  gram = gram_of(x)
  rtn = comq_jax.rtn(3, granularity="channel")
  plain = rtn.quantize_layer(w, gram=gram)
  w_pre = comq_jax.magr(w, gram)
  pre = rtn.quantize_layer(w_pre, gram=gram)
  # Both errors against the ORIGINAL layer output X w.
  plain_error = float(comq_jax.reconstruction_error(w, plain.weights, gram))
  pre_error = float(comq_jax.reconstruction_error(w, pre.weights, gram))
  # Measured: 5.09 against 12.95 (the outliers fall to ~0.25-0.3 of their size).
  assert pre_error < 0.6 * plain_error, (pre_error, plain_error)


@pytest.mark.parametrize("change, message", [
    (dict(w=np.zeros(24, np.float32)), r"w must be 2-D \(d_in, d_out\), got shape \(24,\)"),
    (dict(gram=np.eye(5, dtype=np.float32)), r"gram must have shape \(24, 24\), got \(5, 5\)"),
    (dict(gram=None), "magr needs the Gram matrix"),
    (dict(w=np.ones((24, 5), np.int32)), "w must have a floating dtype, got int32"),
    (dict(w=np.full((24, 5), np.nan, np.float32)), "w contains NaN or inf"),
    (dict(gram=np.full((24, 24), np.inf, np.float32)), "gram contains NaN or inf"),
    (dict(gram=np.zeros((24, 24), np.float32)), "gram is all zero"),
    (dict(w=np.zeros((0, 5), np.float32), gram=np.zeros((0, 0), np.float32)),
     r"at least one input and one output, got shape \(0, 5\)"),
    (dict(alpha=-1e-3), r"alpha must be a finite real scalar >= 0, got -0.001"),
    (dict(alpha=float("nan")), "alpha must be a finite real scalar >= 0"),
    (dict(alpha=np.array([1e-3, 1e-3])), "alpha must be a finite real scalar >= 0"),
    (dict(iters=0), r"iters must be an int >= 1, got 0"),
    (dict(iters=2.5), r"iters must be an int >= 1, got 2.5"),
    (dict(iters=True), r"iters must be an int >= 1, got True"),
    (dict(group_size=0), r"group_size must be an int >= 1, got 0"),
])
def test_bad_inputs_are_refused_with_what_is_allowed(change, message):
  w, x = correlated_layer(8)
  args = dict(w=w, gram=gram_of(x), alpha=1e-3, iters=10) | change
  with pytest.raises(ValueError, match=message):
    comq_jax.magr(args.pop("w"), args.pop("gram"), **args)


SOLVERS = {
    "rtn": lambda **kw: comq_jax.rtn(3, **kw),
    "gptq": lambda **kw: comq_jax.gptq(3, **kw),
    "comq": lambda **kw: comq_jax.comq(3, iters=2, **kw),
    "comq from gptq": lambda **kw: comq_jax.comq(3, iters=2, init="gptq", **kw),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("grid, granularity, group_size", [
    ("asymmetric", "channel", None), ("asymmetric", "group", 8), ("pow2", "channel", None),
    ("symmetric", "layer", None)])
def test_solver_option_quantizes_the_preprocessed_weights_and_measures_the_original(
    name, grid, granularity, group_size):
  w, x = correlated_layer(10)
  gram = gram_of(x)
  grid_kw = dict(grid=grid, granularity=granularity, group_size=group_size)
  with_magr = SOLVERS[name](preprocess="magr", **grid_kw)
  got = with_magr.quantize_layer(w, gram=gram)
  # The paper's alpha for the granularity, and one l-infinity term per grid group.
  grouped = granularity == "group"
  w_pre = comq_jax.magr(w, gram, alpha=1e-4 if grouped else 1e-3,
                        group_size=group_size if grouped else None)
  by_hand = SOLVERS[name](**grid_kw).quantize_layer(w_pre, gram=gram)
  np.testing.assert_array_equal(got.codes, by_hand.codes)
  np.testing.assert_allclose(got.weights, by_hand.weights, rtol=0, atol=1e-7)
  np.testing.assert_allclose(float(got.error),
                             float(comq_jax.reconstruction_error(w, got.weights, gram)),
                             rtol=1e-5)
  # by_hand.error is against w_pre, a different target.
  assert abs(float(got.error) - float(by_hand.error)) > 1e-6 * float(by_hand.error)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_option_lowers_the_3_bit_per_channel_error_of_a_layer_with_outliers(name):
  w, x = correlated_layer(6, d_in=64, d_out=8, n=256, rank=16, noise=0.02)
  rng = np.random.default_rng(7)
  w[rng.choice(64, size=8, replace=False), np.arange(8)] = 0.15
  plain = SOLVERS[name]().quantize_layer(w, x)
  pre = SOLVERS[name](preprocess="magr").quantize_layer(w, x)
  assert float(pre.error) < float(plain.error), (float(pre.error), float(plain.error))


def test_solver_option_runs_in_quantize_model_with_errors_against_the_original():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name="head")(nn.relu(nn.Dense(16, name="hidden")(x)))

  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(64, 12)), jnp.float32)
  model = Net()
  variables = model.init(jax.random.key(0), x)
  solver = comq_jax.comq(3, preprocess="magr", magr_alpha=1e-3, magr_iters=50)
  result = comq_jax.quantize_model(model, variables, [x], solver)
  first = result.layers[0]
  assert first.path == "hidden"
  w = np.asarray(variables["params"]["hidden"]["kernel"])
  q = np.asarray(result.variables["params"]["hidden"]["kernel"])
  gram = gram_of(x)
  np.testing.assert_allclose(first.error, float(comq_jax.reconstruction_error(w, q, gram)),
                             rtol=1e-4)
  assert first.solver.settings()["preprocess"] == "magr"


@pytest.mark.parametrize("kwargs, message", [
    (dict(preprocess="smooth"), r"preprocess must be one of \(None, 'magr'\), got 'smooth'"),
    (dict(magr_alpha=1e-3), "magr_alpha and magr_iters apply only with preprocess='magr'"),
    (dict(magr_iters=10), "magr_alpha and magr_iters apply only with preprocess='magr'"),
    (dict(preprocess="magr", magr_alpha=-1.0), "alpha must be a finite real scalar >= 0"),
    (dict(preprocess="magr", magr_iters=0), "magr_iters must be an int >= 1, got 0"),
])
def test_solver_option_bad_settings_are_refused(kwargs, message):
  for build in (comq_jax.rtn, comq_jax.gptq, comq_jax.comq):
    with pytest.raises(ValueError, match=message):
      build(3, **kwargs)


def test_rtn_with_magr_needs_data():
  w, _ = correlated_layer(12)
  with pytest.raises(ValueError, match="needs calibration data"):
    comq_jax.rtn(3, preprocess="magr").quantize_layer(w)
