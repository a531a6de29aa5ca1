"""Group-wise grids: one grid per `group_size` consecutive inputs of each channel."""

import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from quant_core import grids as grid_lib

D_IN, D_OUT = 144, 12


def layer_data(seed):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(384, D_IN)) * rng.uniform(0.2, 3.0, D_IN)).astype(np.float32)
  return (0.05 * rng.normal(size=(D_IN, D_OUT))).astype(np.float32), x


SOLVERS = {
    "rtn": lambda w, x, **kw: comq_jax.rtn(**kw).quantize_layer(w, x),
    "comq": lambda w, x, **kw: comq_jax.comq(**kw).quantize_layer(w, x),
    "comq_scale_update": lambda w, x, **kw: comq_jax.comq(iters=2, scale_update=True,
                                                          **kw).quantize_layer(w, x),
    "gptq_static": lambda w, x, **kw: comq_jax.gptq(static_groups=True, **kw).quantize_layer(w, x),
}


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("grid", ["asymmetric", "symmetric", "pow2"])
@pytest.mark.parametrize("group_size", [48, 64])  # 64: a last group of 16 inputs
def test_each_group_has_its_own_grid_and_codes(solver, grid, group_size):
  w, x = layer_data(0)
  result = SOLVERS[solver](w, x, bits=3, grid=grid, granularity="group",
                           group_size=group_size)
  groups = -(-D_IN // group_size)
  assert result.group_size == group_size
  assert result.levels.shape[:2] == (D_OUT, groups) and result.scale.shape == (D_OUT, groups)
  levels, codes = np.asarray(result.levels), np.asarray(result.codes)
  group_of = np.arange(D_IN) // group_size
  np.testing.assert_array_equal(
      levels[np.arange(D_OUT)[None, :], group_of[:, None], codes],
      np.asarray(result.weights))
  if not solver.endswith("scale_update"):  # a scale update moves the grid
    for k in range(groups):
      rows = slice(k * group_size, (k + 1) * group_size)
      own = grid_lib.make_grid(jnp.asarray(w[rows].T), bits=3, grid=grid).values()
      np.testing.assert_array_equal(levels[:, k], np.asarray(own))


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric", "pow2"])
@pytest.mark.parametrize("group_size", [48, 64])
def test_comq_groups_beat_rtn_groups_and_scale_updates_never_hurt(grid, group_size):
  w, x = layer_data(1)
  options = dict(bits=3, grid=grid, granularity="group", group_size=group_size)
  rtn = comq_jax.rtn(**options).quantize_layer(w, x)
  comq = comq_jax.comq(**options).quantize_layer(w, x)
  updated = comq_jax.comq(iters=3, scale_update=True, **options).quantize_layer(w, x)
  assert float(comq.error) <= float(rtn.error)
  history = np.asarray(updated.history)
  assert np.all(np.diff(history) <= 1e-6 * history[0]), history
  assert float(updated.error) <= float(comq.error) * (1 + 1e-6)


def test_a_group_as_wide_as_the_layer_is_per_channel():
  w, x = layer_data(2)
  channel = comq_jax.comq(bits=4).quantize_layer(w, x)
  grouped = comq_jax.comq(bits=4, granularity="group", group_size=D_IN).quantize_layer(w, x)
  np.testing.assert_array_equal(np.asarray(grouped.weights), np.asarray(channel.weights))
  np.testing.assert_array_equal(np.asarray(grouped.levels)[:, 0],
                                np.asarray(channel.levels))


@pytest.mark.parametrize("kwargs,message", [
    ({"granularity": "group"}, "needs group_size, an integer >= 1"),
    ({"granularity": "group", "group_size": 0}, "needs group_size, an integer >= 1"),
    ({"granularity": "group", "group_size": 2.5}, "needs group_size, an integer >= 1"),
    ({"granularity": "channel", "group_size": 64}, "only for granularity='group'"),
])
def test_bad_group_options_raise(kwargs, message):
  w, x = layer_data(3)
  for solver in SOLVERS.values():
    with pytest.raises(ValueError, match=message):
      solver(w, x, bits=4, **kwargs)
