"""The grids of llama.cpp's GGUF blocks: ``"signed"`` (Q4_0) and ``"offset"`` (Q4_1).

Q4_0 stores per block of 32 inputs a float16 ``d`` and values ``d (q - 8)``, with
``d = e / -8`` for ``e`` the weight of largest magnitude (sign kept); Q4_1 stores
float16 ``d`` and ``m`` and values ``d q + m``, computed in float32. Every test
here checks the grids (and what each solver makes of them) against those rules
bit for bit.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from quant_core import grids as grid_lib
from quant_core.deploy import codes as packed_codes
from quant_core.deploy import recover

BITS = 4
D_IN, D_OUT = 80, 6  # groups of 32: a last group of 16 inputs
GRANULARITIES = [("channel", None), ("group", 32)]


def _weights(seed=0, d_in=D_IN, d_out=D_OUT):
  """``(d_out, d_in)`` channel-major rows over several binades, some of them
  (the odd ones) of mostly one sign."""
  rng = np.random.default_rng(seed)
  wt = rng.standard_normal((d_out, d_in)) * 10.0 ** rng.uniform(-3, 0, (d_out, 1))
  wt[1::2] = np.abs(wt[1::2]) * np.where(np.arange(d_out // 2) % 2, 1, -1)[:, None]
  wt[1::2, ::7] *= -0.5
  return wt.astype(np.float32)


def _rows(wt, group_size):
  """The grid rows of ``wt``, as make_grid pads them: ``(rows, size)``."""
  return np.asarray(grid_lib.group_rows(jnp.asarray(wt), group_size)) if group_size else wt


def _is_float16(x):
  x = np.asarray(x, np.float32)
  return np.array_equal(x.astype(np.float16).astype(np.float32), x)


def _signed_extreme(rows):
  """The first weight of largest magnitude of each row (llama.cpp's loop)."""
  return rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)]


@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
@pytest.mark.parametrize("scale_dtype", [None, "float16"])
def test_signed_grid_is_the_q4_0_rule(granularity, group_size, scale_dtype):
  wt = _weights(1)
  make = lambda w: grid_lib.make_grid(w, bits=BITS, grid="signed", granularity=granularity,
                                      group_size=group_size, scale_dtype=scale_dtype)
  g = jax.jit(make)(wt)
  eager = make(jnp.asarray(wt))
  values = np.asarray(g.values())
  np.testing.assert_array_equal(np.asarray(eager.values()), values)
  rows = _rows(wt, group_size)
  assert values.shape == (rows.shape[0], 2**BITS) == (grid_lib.num_groups(
      D_IN, group_size) * D_OUT, grid_lib.num_levels(BITS, "signed"))
  assert np.all(np.diff(values, axis=1) > 0)
  assert g.offset is None
  extreme = _signed_extreme(rows)
  zero_point = np.asarray(g.zero_point)
  np.testing.assert_array_equal(zero_point, np.where(extreme > 0, 7, 8))
  step = np.asarray(g.step)
  codes = np.arange(2**BITS)[None, :]
  # Every value is step * (code - zero_point), one float32 product.
  np.testing.assert_array_equal(
      values, step[:, None] * (codes - zero_point[:, None]).astype(np.float32))
  exact = np.abs(extreme) / np.float32(8)
  if scale_dtype is None:
    np.testing.assert_array_equal(step, exact)
    # The extreme is a level: the top one if positive, the bottom one if negative.
    np.testing.assert_array_equal(np.where(extreme > 0, values[:, -1], values[:, 0]),
                                  extreme)
  else:
    # The least float16 value >= |e| / 8.
    assert _is_float16(step) and np.all(step >= exact)
    below = np.nextafter(step.astype(np.float16), np.float16(0)).astype(np.float32)
    assert np.all(below < exact)


@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
@pytest.mark.parametrize("scale_dtype", [None, "float16"])
def test_offset_grid_is_the_q4_1_rule(granularity, group_size, scale_dtype):
  wt = _weights(2)
  make = lambda w: grid_lib.make_grid(w, bits=BITS, grid="offset", granularity=granularity,
                                      group_size=group_size, scale_dtype=scale_dtype)
  g = jax.jit(make)(wt)
  values = np.asarray(g.values())
  # Under jit as eagerly: the product is rounded before the sum (no fused multiply-add).
  np.testing.assert_array_equal(np.asarray(make(jnp.asarray(wt)).values()), values)
  rows = _rows(wt, group_size)
  assert values.shape == (rows.shape[0], grid_lib.num_levels(BITS, "offset"))
  assert np.all(np.diff(values, axis=1) > 0)
  step, minimum = np.asarray(g.step), np.asarray(g.offset)
  np.testing.assert_array_equal(np.asarray(g.zero_point), 0)
  np.testing.assert_array_equal(values[:, 0], minimum)
  t = np.arange(2**BITS, dtype=np.float32)[None, :]
  # Bit for bit what a Q4_1 dequantizer computes: float32 d * q, then + m.
  np.testing.assert_array_equal(values, (step[:, None] * t) + minimum[:, None])
  lo, hi = rows.min(axis=1), rows.max(axis=1)
  assert np.all(minimum <= lo)
  # The top level reaches the max up to the float32 rounding of the step's quotient
  # and of the sum.
  slack = 4 * np.spacing(np.maximum(np.abs(hi), np.abs(minimum)))
  assert np.all(values[:, -1] >= hi - slack)
  if scale_dtype is None:
    np.testing.assert_array_equal(minimum, lo)
    np.testing.assert_array_equal(step, (hi - lo) / np.float32(2**BITS - 1))
  else:
    # The min rounded down, then the step of what is left rounded up, to float16.
    assert _is_float16(step) and _is_float16(minimum)
    above = np.nextafter(minimum.astype(np.float16), np.float16(np.inf)).astype(np.float32)
    assert np.all(above > lo)
    exact = (hi - minimum) / np.float32(2**BITS - 1)
    assert np.all(step >= exact)
    below = np.nextafter(step.astype(np.float16), np.float16(0)).astype(np.float32)
    assert np.all(below < exact)


def test_ties_constant_rows_and_layer_grids():
  # Equal magnitudes: the first one decides the layout, as llama.cpp's strict `<`.
  wt = np.array([[0.5, -0.5, 0.25, 0.0], [-0.5, 0.5, 0.25, 0.0], [0.0] * 4,
                 [0.3] * 4], np.float32)
  g = grid_lib.make_grid(jnp.asarray(wt), bits=BITS, grid="signed")
  np.testing.assert_array_equal(np.asarray(g.zero_point), [7, 8, 8, 7])
  np.testing.assert_array_equal(np.asarray(g.step), [0.0625, 0.0625, 1.0,
                                                     np.float32(0.3) / 8])
  offset = grid_lib.make_grid(jnp.asarray(wt), bits=BITS, grid="offset")
  values = np.asarray(offset.values())
  # A constant row c: min c, step |c| (1 for zeros), c the first level.
  np.testing.assert_array_equal(values[2:, 0], [0.0, np.float32(0.3)])
  np.testing.assert_array_equal(np.asarray(offset.step)[2:], [1.0, np.float32(0.3)])
  for grid in ("signed", "offset"):
    layer = grid_lib.make_grid(jnp.asarray(_weights(3)), bits=BITS, grid=grid,
                               granularity="layer")
    whole = grid_lib.make_grid(jnp.asarray(_weights(3).reshape(1, -1)), bits=BITS, grid=grid)
    np.testing.assert_array_equal(np.asarray(layer.values()),
                                  np.repeat(np.asarray(whole.values()), D_OUT, axis=0))


def test_options_sizes_and_shrink_factor():
  assert {"signed", "offset"} <= set(grid_lib.GRIDS)
  assert grid_lib.parameter_bytes("signed", 3) == grid_lib.parameter_bytes("asymmetric", 3)
  assert grid_lib.parameter_bytes("offset", 3) == 24  # float32 step and min
  with pytest.raises(ValueError, match="grid='offset' needs scalar=1.0"):
    comq_jax.comq(BITS, grid="offset", scalar=0.9)
  with pytest.raises(ValueError, match="'signed', 'offset'"):
    comq_jax.rtn(BITS, grid="nf4")
  with pytest.raises(ValueError, match="scale_dtype='float16' is for the uniform grids"):
    comq_jax.rtn(BITS, grid="signed", scalar=0.9, scale_dtype="float16")
  # "signed" takes the shrink factor as "symmetric" does: units scalar * t.
  wt = jnp.asarray(_weights(4))
  shrunk = grid_lib.make_grid(wt, bits=BITS, grid="signed", scalar=0.75)
  plain = grid_lib.make_grid(wt, bits=BITS, grid="signed")
  np.testing.assert_array_equal(np.asarray(shrunk.units), 0.75 * np.asarray(plain.units))
  np.testing.assert_array_equal(np.asarray(shrunk.unit_scale), 0.75)


def _layer(seed=5):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((192, D_IN)) * rng.uniform(0.2, 3.0, D_IN)).astype(np.float32)
  return _weights(seed).T.copy(), x


SOLVERS = {
    "rtn": comq_jax.rtn,
    "gptq": comq_jax.gptq,
    "comq": lambda bits, **kw: comq_jax.comq(bits, iters=3, **kw),
    "comq_scale_update": lambda bits, **kw: comq_jax.comq(bits, iters=3, scale_update=True,
                                                          **kw),
}


@pytest.mark.parametrize("grid", ["signed", "offset"])
@pytest.mark.parametrize("granularity,group_size,scale_dtype", [
    ("channel", None, None), ("group", 32, "float16")])
def test_every_solver_quantizes_onto_the_grid(grid, granularity, group_size, scale_dtype):
  w, x = _layer()
  options = dict(grid=grid, granularity=granularity, group_size=group_size,
                 scale_dtype=scale_dtype)
  results = {name: make(BITS, **options).quantize_layer(w, x)
             for name, make in SOLVERS.items()}
  t = np.arange(2**BITS, dtype=np.float32)
  for name, r in results.items():
    assert (r.grid, r.bits, r.group_size) == (grid, BITS, group_size), name
    codes, levels = np.asarray(r.codes), np.asarray(r.levels)
    assert codes.min() >= 0 and codes.max() < 2**BITS, name
    if group_size is None:
      on_grid = np.take_along_axis(levels, codes.T, axis=1).T
    else:
      group_of = np.arange(D_IN) // group_size
      on_grid = levels[np.arange(D_OUT)[None, :], group_of[:, None], codes]
    np.testing.assert_array_equal(on_grid, np.asarray(r.weights), err_msg=name)
    # The level tables keep the GGUF identities after every solver (scale steps too).
    scale = np.asarray(r.scale)[..., None]
    if grid == "signed":
      expected = scale * (t - np.asarray(r.zero_point)[..., None]).astype(np.float32)
    else:
      expected = scale * t + levels[..., :1]
    np.testing.assert_array_equal(levels, expected, err_msg=name)
    if scale_dtype is not None:
      assert _is_float16(r.scale), name
      assert grid == "signed" or _is_float16(levels[..., 0]), name
  rtn_error = float(results["rtn"].error)
  tol = 1e-6 * rtn_error
  for name in ("comq", "comq_scale_update"):
    r = results[name]
    assert float(r.error) <= rtn_error + tol, name
    history = np.asarray(r.history)
    assert np.all(np.diff(history) <= tol), (name, history)
  assert float(results["comq_scale_update"].error) <= float(results["comq"].error) + tol


@pytest.mark.parametrize("group_size", [None, 8])
def test_signed_packs_as_asymmetric_and_offset_is_refused(group_size):
  w, x = _layer(6)
  granularity = "channel" if group_size is None else "group"
  signed = comq_jax.comq(BITS, grid="signed", granularity=granularity,
                         group_size=group_size).quantize_layer(w, x)
  packed = packed_codes.pack_layer_quantization(signed)
  assert not packed.symmetric
  np.testing.assert_array_equal(packed_codes.unpack_matrix(packed), signed.weights)
  np.testing.assert_array_equal(packed_codes.unpack_codes(packed)[:D_IN], signed.codes)
  recovered = recover.pack_matrix_values(signed.weights, bits=BITS, grid="signed",
                                         granularity=granularity, group_size=group_size)
  np.testing.assert_array_equal(packed_codes.unpack_matrix(recovered), signed.weights)
  offset = dataclasses.replace(signed, grid="offset")
  with pytest.raises(ValueError, match="grid='offset'.*GGUF Q4_1"):
    packed_codes.pack_layer_quantization(offset)
  with pytest.raises(ValueError, match="grid must be one of"):
    recover.pack_matrix_values(signed.weights, bits=BITS, grid="offset",
                               granularity=granularity, group_size=group_size)
