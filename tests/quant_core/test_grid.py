"""Exact float32 fidelity of quant_core.grids.make_grid to the official COMQ grid.

The official rule (tests/data/README.md): per output channel ``j``,
``delta_j = (max_j - min_j) / (2^bits - 1)`` as an IEEE float32 division,
``z_j = round_half_even(min_j / delta_j)`` and values
``(scalar * (z_j + t)) * delta_j``. Everything here is compared bit for bit:
a step 1 ulp off can flip ``z`` at a half-integer ``min / delta`` and shift
the whole grid by one level.
"""

import jax
import numpy as np
import pytest

import comq_jax
from quant_core import grids as grid_lib

SEEDS = (0, 1, 2)
BITS = tuple(range(2, 9))


@pytest.fixture(params=[False, True], ids=["xla_opt", "xla_noopt"])
def xla_mode(request):
  """Turns XLA optimizations on (as experiments run) or off (as the suite)."""
  # The reciprocal rewrite happens in both modes; the flag is not part of the
  # jit cache key, so only freshly jitted functions see it.
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", request.param)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _official_grid(wt, bits, scalar=1.0):
  """NumPy float32 official grid of each row of ``wt`` (channel-major).

  Returns:
    ``(delta, z, values)``: ``(d_out,)`` step, ``(d_out,)`` float zero
    offset ``z`` and ``(d_out, 2^bits)`` grid values, all float32.
  """
  wt = np.asarray(wt, np.float32)
  hi, lo = wt.max(axis=1), wt.min(axis=1)
  delta = (hi - lo) / np.float32(2**bits - 1)
  z = np.round(lo / delta)  # NumPy rounds half to even, as torch.
  t = np.arange(2**bits, dtype=np.float32)
  values = (np.float32(scalar) * (z[:, None] + t)) * delta[:, None]
  return delta, z, values


def _random_channels(rng, d_out, d_in):
  """Normal rows with per-row scales over several binades."""
  scale = 10.0 ** rng.uniform(-3.0, 1.0, (d_out, 1))
  return (rng.standard_normal((d_out, d_in)) * scale).astype(np.float32)


def _half_integer_channels(rng, d_out, d_in, bits):
  """Rows whose exact float32 ``min / delta`` is a half-integer ``-(k+1/2)``.

  ``delta = m 2^e`` (``m`` odd), ``min = -(k + 1/2) delta`` and
  ``max = min + (2^bits - 1) delta`` are dyadic with short mantissas, so they
  and the true quotients are exact in float32; a step 1 ulp off moves the
  quotient off the tie.
  """
  n_levels = 2**bits - 1
  m = 2 * rng.integers(0, 1024, d_out) + 1
  delta = m * np.ldexp(1.0, rng.integers(-14, 2, d_out))
  k = rng.integers(0, n_levels, d_out)
  lo = -(k + 0.5) * delta
  hi = lo + n_levels * delta
  u = rng.uniform(0.0, 1.0, (d_out, d_in))
  rows = lo[:, None] + u * (hi - lo)[:, None]
  rows[:, 0], rows[:, -1] = lo, hi
  rows = rng.permuted(rows, axis=1).astype(np.float32)
  # The construction must really sit on ties, or the test proves nothing.
  got_delta, _, _ = _official_grid(rows, bits)
  np.testing.assert_array_equal(got_delta, delta.astype(np.float32))
  np.testing.assert_array_equal(rows.min(axis=1) / got_delta,
                                (-(k + 0.5)).astype(np.float32))
  return rows


def _channels(seed, bits, d_in=24):
  rng = np.random.default_rng([seed, bits])
  return np.concatenate([_random_channels(rng, 300, d_in),
                         _half_integer_channels(rng, 300, d_in, bits)])


def _nearest_lower_tie(values, wt):
  """NumPy round-to-nearest onto each row's grid, ties to the lower value."""
  dist = np.abs(values[:, None, :] - wt[:, :, None])
  index = np.argmin(dist, axis=-1)
  return np.take_along_axis(values, index, axis=1)


def _assert_grid_equal(g, delta, z, values):
  np.testing.assert_array_equal(np.asarray(g.step), delta)
  np.testing.assert_array_equal(np.asarray(g.zero_point),
                                (-z).astype(np.int32))
  np.testing.assert_array_equal(np.asarray(g.values()), values)


def test_reproduction_case_matches_official_grid():
  # min/delta = -1.5 / fl(3/15) is exactly -7.5 in float32: z = -8. With a
  # reciprocal multiply the step was 1 ulp high and z = -7 (levels
  # -1.4 ... 1.6).
  w = np.array([[-1.5], [0.3], [1.5]], np.float32)
  r = comq_jax.rtn(bits=4).quantize_layer(w)
  delta = np.float32(3) / np.float32(15)
  want = ((np.float32(-8) + np.arange(16, dtype=np.float32)) * delta)[None]
  np.testing.assert_array_equal(np.asarray(r.levels), want)
  np.testing.assert_array_equal(np.asarray(r.scale), [delta])
  np.testing.assert_array_equal(np.asarray(r.zero_point), [8])
  np.testing.assert_array_equal(np.asarray(r.weights),
                                _nearest_lower_tie(want, w.T).T)
  assert float(r.levels[0, 0]) == float(np.float32(-1.6))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scalar", [1.0, 0.65])
def test_jitted_make_grid_matches_official_rule_exactly(bits, scalar,
                                                        xla_mode):
  del xla_mode  # Each test jits a fresh function, compiled in that mode.
  make = jax.jit(lambda wt: grid_lib.make_grid(wt, bits=bits, scalar=scalar))
  for seed in SEEDS:
    wt = _channels(seed, bits)
    _assert_grid_equal(make(wt), *_official_grid(wt, bits, scalar))


@pytest.mark.parametrize("bits", BITS)
def test_round_to_nearest_matches_official_rule_exactly(bits):
  for seed in SEEDS:
    wt = _channels(seed, bits)
    delta, z, values = _official_grid(wt, bits)
    r = comq_jax.rtn(bits=bits).quantize_layer(wt.T)
    np.testing.assert_array_equal(np.asarray(r.levels), values)
    np.testing.assert_array_equal(np.asarray(r.scale), delta)
    np.testing.assert_array_equal(np.asarray(r.zero_point),
                                  (-z).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(r.weights),
                                  _nearest_lower_tie(values, wt).T)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_vmapped_make_grid_is_exact(bits, xla_mode):
  del xla_mode
  # comq_jax.model vmaps the solver over stacked layers: vmap must not bring
  # back a reciprocal multiply through a broadcast divisor.
  wt = _channels(0, bits)
  stacked = wt.reshape(6, 100, wt.shape[1])
  g = jax.jit(jax.vmap(lambda w: grid_lib.make_grid(w, bits=bits)))(stacked)
  delta, z, values = _official_grid(wt, bits)
  np.testing.assert_array_equal(np.asarray(g.step).reshape(-1), delta)
  np.testing.assert_array_equal(np.asarray(g.zero_point).reshape(-1),
                                (-z).astype(np.int32))
  np.testing.assert_array_equal(
      (np.asarray(g.units) * np.asarray(g.step)[..., None]).reshape(
          values.shape), values)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layer_granularity_is_exact(bits, xla_mode):
  del xla_mode
  rng = np.random.default_rng(bits)
  layers = [_random_channels(rng, 40, 16) for _ in range(5)]
  for tie in _half_integer_channels(rng, 20, 16, bits):
    # The tie row holds the layer's min and max: the layer sits on the tie.
    inner = rng.uniform(tie.min(), tie.max(), (39, 16)).astype(np.float32)
    layers.append(np.concatenate([inner, tie[None]]))
  for wt in layers:
    g = jax.jit(lambda w: grid_lib.make_grid(w, bits=bits,
                                             granularity="layer"))(wt)
    # One statistic for the whole matrix: the official rule on one row.
    delta, z, values = _official_grid(wt.reshape(1, -1), bits)
    n = wt.shape[0]
    _assert_grid_equal(g, np.repeat(delta, n), np.repeat(z, n),
                       np.repeat(values, n, axis=0))


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_step_is_exact_division(bits, xla_mode):
  del xla_mode
  half = np.float32(2 ** (bits - 1) - 1)
  make = jax.jit(lambda wt: grid_lib.make_grid(wt, bits=bits,
                                               grid="symmetric"))
  for seed in SEEDS:
    wt = _channels(seed, bits)
    step = np.abs(wt).max(axis=1) / half
    g = make(wt)
    np.testing.assert_array_equal(np.asarray(g.step), step)
    t = np.arange(-half, half + 1, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(g.values()),
                                  t[None, :] * step[:, None])
