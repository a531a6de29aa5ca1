"""Tests of the COMQ layer solver (comq_jax.layer, quant_core.grids)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import quant_core
from quant_core import grids as grid_lib
from comq_jax import layer
from tests import helpers


def _data(seed=0, n=256, d_in=24, d_out=12):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d_in)) * rng.uniform(0.2, 3.0, d_in)
  x[:, :3] += rng.uniform(-2.0, 2.0, 3)
  w = rng.normal(0.0, 0.05, (d_in, d_out))
  return jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)


def test_matches_official_outputs_exactly():
  ref = np.load(helpers.reference_file("comq_official_synthetic.npz"))
  for k in range(int(ref["n_cases"])):
    w, x, q = (ref[f"case{k}_{n}"] for n in ("W", "X", "Q"))
    bits, iters, greedy, scalar = ref[f"case{k}_params"]
    bits = int(bits)
    r = comq_jax.comq(bits=bits, iters=int(iters), order="greedy" if greedy else "cyclic",
                      scalar=float(scalar)).quantize_layer(w, x)
    # The official grid as its float32 code evaluates it (Flax layout: one
    # channel per column).
    hi, lo = w.max(axis=0), w.min(axis=0)
    delta = (hi - lo) / np.float32(2**bits - 1)
    z = np.round(lo / delta)
    t = np.arange(2**bits, dtype=np.float32)
    levels = (np.float32(scalar) * (z[:, None] + t)) * delta[:, None]
    np.testing.assert_array_equal(np.asarray(r.levels), levels,
                                  err_msg=f"case {k}")
    # Every official entry is exactly one level: compare grid indices.
    hits = q.T[:, :, None] == levels[:, None, :]
    assert np.all(hits.sum(axis=-1) == 1), f"case {k}: Q off the grid"
    np.testing.assert_array_equal(np.asarray(r.codes),
                                  np.argmax(hits, axis=-1).T,
                                  err_msg=f"case {k}")
    np.testing.assert_array_equal(np.asarray(r.weights), q,
                                  err_msg=f"case {k}")
    np.testing.assert_allclose(float(r.error), float(ref[f"case{k}_err"]),
                               rtol=1e-4)


def test_gram_input_equals_x_input_and_streaming():
  w, x = _data()
  acc = None
  for chunk in jnp.split(x, 4):
    acc = quant_core.accumulate_gram(acc, chunk)
  np.testing.assert_allclose(acc.gram, quant_core.accumulate_gram(None, x).gram,
                             rtol=1e-5, atol=1e-3)
  assert int(acc.count) == x.shape[0]
  a = comq_jax.comq(bits=3).quantize_layer(w, x)
  b = comq_jax.comq(bits=3).quantize_layer(w, gram=acc.gram)
  np.testing.assert_array_equal(a.codes, b.codes)


def test_error_is_true_reconstruction_error_and_decoding():
  w, x = _data(1)
  r = comq_jax.comq(bits=4, iters=2).quantize_layer(w, x)
  direct = np.linalg.norm(np.asarray(x, np.float64) @ (
      np.asarray(w, np.float64) - np.asarray(r.weights, np.float64)))
  np.testing.assert_allclose(float(r.error), direct, rtol=1e-4)
  assert r.weights.shape == w.shape and r.weights.dtype == w.dtype
  decoded = jnp.take_along_axis(r.levels, r.codes.T, axis=1).T
  np.testing.assert_array_equal(decoded, r.weights)
  uniform = r.scale[None, :] * (r.codes - r.zero_point[None, :]).astype(
      jnp.float32)
  np.testing.assert_allclose(uniform, r.weights, rtol=1e-5, atol=1e-7)
  assert int(jnp.min(r.codes)) >= 0 and int(jnp.max(r.codes)) < 16


@pytest.mark.parametrize("grid,granularity,bits", [
    ("asymmetric", "channel", 2), ("symmetric", "channel", 4),
    ("pow2", "channel", 3), ("asymmetric", "layer", 3)])
def test_objective_never_increases_and_beats_rtn(grid, granularity, bits):
  for seed in (2, 3):
    w, x = _data(seed)
    kw = dict(bits=bits, grid=grid, granularity=granularity)
    rtn = comq_jax.rtn(**kw).quantize_layer(w, x)
    one = comq_jax.comq(iters=1, **kw).quantize_layer(w, x)
    three = comq_jax.comq(iters=3, **kw).quantize_layer(w, x)
    scaled = comq_jax.comq(iters=3, scale_update=True, **kw).quantize_layer(w, x)
    tol = 1e-6 * float(rtn.error)
    assert float(one.error) <= float(rtn.error) + tol
    assert float(three.error) <= float(one.error) + tol
    assert float(scaled.error) <= float(three.error) + tol
    for hist in (three.history, scaled.history):
      assert np.all(np.diff(np.asarray(hist)) <= tol), hist


@pytest.mark.parametrize("order", ["greedy", "cyclic", "diag"])
@pytest.mark.parametrize("granularity, group_size, grid", [
    ("channel", None, "asymmetric"), ("group", 8, "asymmetric"), ("channel", None, "pow2"),
    ("channel", None, "signed"), ("group", 8, "offset")])
def test_no_sweep_of_any_order_raises_the_objective(order, granularity, group_size, grid):
  # The property each visiting order must keep: every coordinate step is an exact 1-D
  # minimisation over the grid, so no sweep (and no scale step) raises the objective,
  # from W or from GPTQ's solution.
  for seed in (5,):
    w, x = _data(seed)
    kw = dict(bits=3, grid=grid, granularity=granularity, group_size=group_size,
              order=order, iters=4)
    rtn = comq_jax.rtn(3, grid=grid, granularity=granularity,
                       group_size=group_size).quantize_layer(w, x)
    tol = 1e-6 * float(rtn.error)
    for extra in ({}, {"scale_update": grid != "pow2"}, {"init": "gptq"}):
      result = comq_jax.comq(**kw, **extra).quantize_layer(w, x)
      history = np.asarray(result.history)
      assert history.size >= 4 and np.all(np.diff(history) <= tol), (extra, history)
      assert float(result.error) <= float(rtn.error) + tol


def test_pow2_levels_are_inq_codebook():
  w, x = _data(4)
  plain = comq_jax.comq(bits=4, grid="pow2", iters=2).quantize_layer(w, x)
  scaled = comq_jax.comq(bits=4, grid="pow2", iters=2, scale_update=True).quantize_layer(w, x)
  w64 = np.asarray(w, np.float64)
  for j in range(w.shape[1]):
    # The INQ set of channel j, from scratch (Zhou et al., ICLR 2017, Eqs. 2-3): n1 with
    # 0.75 * 2^n1 <= max|w_j| < 1.5 * 2^n1, 4 bits: {0, +-2^k : n1 - 3 <= k <= n1}.
    top = np.abs(w64[:, j]).max()
    n1 = int(np.floor(np.log2(top / 0.75)))
    assert 0.75 * 2.0**n1 <= top < 1.5 * 2.0**n1
    codebook = {0.0} | {sign * 2.0**k for k in range(n1 - 3, n1 + 1) for sign in (1, -1)}
    assert set(np.asarray(plain.weights[:, j], np.float64).tolist()) <= codebook, j
    # The scale step moves the set by whole octaves: the nonzero magnitudes stay
    # powers of two within a window of 4 octaves.
    col = np.asarray(scaled.weights[:, j], np.float64)
    mantissa, exponent = np.frexp(np.abs(col[col != 0]))
    assert np.all(mantissa == 0.5), j
    assert exponent.max() - exponent.min() <= 3, j
  assert plain.levels.shape[1] == scaled.levels.shape[1] == 2**3 + 1


def test_greedy_order_is_stable_argsort_of_scores():
  w, x = _data(9, d_in=40, d_out=6)
  x = x.at[:, 7].set(0.0)  # a dead input: score 0 in every channel
  w = w.at[:, 4].set(0.0)  # channel 4: every score ties at 0
  diag = jnp.sum(x * x, axis=0)
  order = layer.greedy_order(w.T, diag)
  score = np.sqrt(np.asarray(diag))[None, :] * np.abs(np.asarray(w.T))
  np.testing.assert_array_equal(order,
                                np.argsort(-score, axis=1, kind="stable"))


def test_reconstruction_error_matches_direct_norm():
  w, x = _data(10)
  q = comq_jax.rtn(bits=3).quantize_layer(w).weights
  direct = np.linalg.norm(np.asarray(x, np.float64) @ (
      np.asarray(w, np.float64) - np.asarray(q, np.float64)))
  gram = quant_core.accumulate_gram(None, x).gram
  got = comq_jax.reconstruction_error(w, q, gram)
  np.testing.assert_allclose(float(got), direct, rtol=1e-5)


def test_symmetric_grid_is_symmetric_with_zero():
  w, _ = _data(5)
  g = grid_lib.make_grid(w.T, bits=3, grid="symmetric")
  v = np.asarray(g.values())
  np.testing.assert_allclose(v, -v[:, ::-1])
  assert v.shape[1] == 7 and np.all(v[:, 3] == 0)


def _numpy_comq_sweep(w, x, bits, greedy, order=None):
  """One COMQ sweep from Q = W (comq.md; Zhang et al., arXiv 2403.07134), from scratch
  in float64: channel j visits its inputs in order (greedy: by descending
  ||x_i|| |w_ij|, ties by index), setting q_ij to the min-max grid level nearest to
  the 1-D minimiser w_ij + x_i^T X (w_j - q_j) / ||x_i||^2, ties to the lower level.
  The grid is the official float32 one (as in test_matches_official_outputs_exactly)."""
  w32 = np.asarray(w, np.float32)
  hi, lo = w32.max(axis=0), w32.min(axis=0)
  step = (hi - lo) / np.float32(2**bits - 1)
  z = np.round(lo / step)
  levels = ((z[:, None] + np.arange(2**bits, dtype=np.float32)) * step[:, None]).astype(
      np.float64)
  w, x = w32.astype(np.float64), np.asarray(x, np.float64)
  gram = x.T @ x
  q = w.copy()
  codes = np.zeros(w.shape, np.int64)
  for j in range(w.shape[1]):
    visits = (np.argsort(-np.sqrt(np.diag(gram)) * np.abs(w[:, j]), kind="stable")
              if greedy else range(w.shape[0]) if order is None else order)
    for i in visits:
      residual = gram[i] @ (w[:, j] - q[:, j]) - gram[i, i] * (w[i, j] - q[i, j])
      target = w[i, j] + residual / gram[i, i]
      codes[i, j] = np.argmin(np.abs(levels[j] - target))
      q[i, j] = levels[j, codes[i, j]]
  return codes, q


def test_cyclic_and_greedy_sweeps_match_a_numpy_coordinate_descent_and_layer_scale_is_shared():
  w, x = _data(6)
  g = comq_jax.comq(bits=3, order="greedy").quantize_layer(w, x)
  c = comq_jax.comq(bits=3, order="cyclic").quantize_layer(w, x)
  for result, greedy in ((g, True), (c, False)):
    codes, q = _numpy_comq_sweep(w, x, 3, greedy)
    np.testing.assert_array_equal(np.asarray(result.codes), codes, err_msg=f"{greedy=}")
    np.testing.assert_allclose(np.asarray(result.weights), q, rtol=0, atol=1e-7)
  assert not np.array_equal(g.codes, c.codes)
  lay = comq_jax.comq(bits=3, granularity="layer", scale_update=True).quantize_layer(w, x)
  assert np.unique(np.asarray(lay.scale)).size == 1


def test_diag_order_is_one_order_by_descending_gram_diagonal_for_every_channel():
  w, x = _data(6)
  result = comq_jax.comq(bits=3, order="diag").quantize_layer(w, x)
  gram = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
  order = np.argsort(-np.diag(gram), kind="stable")
  assert not np.array_equal(order, np.arange(len(order)))  # not the cyclic order
  codes, q = _numpy_comq_sweep(w, x, 3, greedy=False, order=order)
  np.testing.assert_array_equal(np.asarray(result.codes), codes)
  np.testing.assert_allclose(np.asarray(result.weights), q, rtol=0, atol=1e-7)
  rtn = comq_jax.rtn(bits=3).quantize_layer(w, x)
  assert float(result.error) < float(rtn.error)


def test_dead_input_and_constant_channel_are_finite():
  w, x = _data(7)
  x = x.at[:, 5].set(0.0)
  w = w.at[:, 2].set(0.03).at[:, 3].set(0.0)
  r = comq_jax.comq(bits=2, iters=2).quantize_layer(w, x)
  assert bool(jnp.all(jnp.isfinite(r.weights)))
  scaled = comq_jax.comq(bits=2, iters=2, scale_update=True).quantize_layer(w, x)
  assert bool(jnp.all(jnp.isfinite(scaled.weights)))
  np.testing.assert_array_equal(r.weights[:, 2], w[:, 2])
  np.testing.assert_array_equal(r.weights[:, 3], w[:, 3])
  rtn = comq_jax.rtn(bits=2).quantize_layer(w)
  np.testing.assert_array_equal(r.weights[5], rtn.weights[5])


def test_runs_under_outer_jit():
  w, x = _data(8)
  f = jax.jit(lambda w, x: comq_jax.comq(bits=4).quantize_layer(w, x).weights)
  np.testing.assert_array_equal(f(w, x),
                                comq_jax.comq(bits=4).quantize_layer(w, x).weights)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"),
    (dict(bits=4, order="random"), "order"),
    (dict(bits=4, grid="log"), "grid"),
    (dict(bits=4, granularity="tensor"), "granularity"),
    (dict(bits=4, iters=0), "iters"),
    (dict(bits=4, scalar=0.0), "scalar"),
    (dict(bits=4, grid="pow2", scalar=0.65), "pow2"),
])
def test_bad_options_raise(kwargs, message):
  w, x = _data()
  with pytest.raises(ValueError, match=message):
    comq_jax.comq(**kwargs)


def test_bad_inputs_raise():
  w, x = _data()
  with pytest.raises(ValueError, match="x must have shape"):
    comq_jax.comq(bits=4).quantize_layer(w, x[:, :-1])
  with pytest.raises(ValueError, match="NaN"):
    comq_jax.comq(bits=4).quantize_layer(w.at[0, 0].set(jnp.nan), x)
  with pytest.raises(ValueError, match="NaN"):
    comq_jax.comq(bits=4).quantize_layer(w, x.at[0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match="either x or gram"):
    comq_jax.comq(bits=4).quantize_layer(w, x, gram=jnp.eye(24))
  with pytest.raises(ValueError, match="calibration data"):
    comq_jax.comq(bits=4).quantize_layer(w)
  with pytest.raises(ValueError, match="gram must have shape"):
    comq_jax.comq(bits=4).quantize_layer(w, gram=jnp.eye(3))
