"""One contract suite run over every quantizer in the registry.

Each entry maps ``(weights, bits)`` to an :class:`Outcome`. A new quantizer
registers here and inherits every check.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import inq_jax
from tests import helpers


class Outcome(NamedTuple):
  quantized: jax.Array
  in_codebook: jax.Array  # bool, per weight
  masks: list  # (portion, frozen mask) after each INQ step; empty otherwise
  error: float  # the quantity the quantizer minimises


class Quantizer(NamedTuple):
  name: str
  bits: tuple
  run: Callable  # (w, bits) -> Outcome
  num_levels: Callable  # bits -> most distinct values in one output channel
  # Min-max grids are rebuilt from the weights' range, and COMQ may move an
  # extreme weight off an extreme level, so only grids anchored on a power of
  # two (max |w| -> n1) are exactly idempotent.
  idempotent: bool = True
  # Whether the outcome carries INQ's frozen masks.
  has_masks: bool = False
  # Each weight goes to its nearest value in a codebook that only grows with
  # bits (b-bit set inside the (b+1)-bit one), so no weight's error can grow
  # with bits. True of power-of-two rounding (pow2_quantize, INQ without
  # retraining, RTN on the pow2 grid): n1 comes from max|w| alone and
  # n2 = n1 + 1 - 2^(b-2) falls as b grows (see
  # test_pow2_rule_is_nearest_on_nested_sets). Not of min-max grids, whose
  # b- and (b+1)-bit levels differ (test_min_max_grids_are_not_nested), nor
  # of COMQ, a descent on ||XW - XQ|| rather than a rounding of each weight.
  nearest_on_nested_codebooks: bool = False


def pow2_levels(bits):
  return 2 ** (bits - 1) + 1


def weight_error(q, w):
  return float(jnp.sum((q.astype(jnp.float32) - w.astype(jnp.float32)) ** 2))


def numpy_levels(w, bits, grid, per_channel=True):
  """``(d_out, L)`` levels of each column of ``w``, from scratch in numpy, as comq.md
  and inq.md define them; uniform grids are computed in float32 (the solvers' dtype
  for 16-bit weights, comq_jax.objective.compute_dtype) and rounded to ``w``'s dtype:

  * asymmetric (official COMQ): step (max - min) / (2^b - 1), z = round_half_even(
    min / step), levels (z + t) * step, t = 0..2^b-1;
  * symmetric: step max|w| / (2^(b-1) - 1), levels t * step, |t| <= 2^(b-1) - 1;
  * pow2 (INQ, Zhou et al., ICLR 2017, Eqs. 2-3): n1 with 0.75 * 2^n1 <= max|w| <
    1.5 * 2^n1, levels {0, +-2^k : n1 + 1 - 2^(b-2) <= k <= n1}; with
    ``per_channel=False`` one n1 from the whole tensor (INQ's per-layer set).
  """
  w = np.asarray(w)
  dtype = w.dtype
  if grid == "pow2":
    top = np.abs(w.astype(np.float64)).max(axis=0 if per_channel else None)
    top = np.broadcast_to(top, (w.shape[1],))
    n1 = np.floor(np.log2(top / 0.75)).astype(int)
    assert np.all((0.75 * 2.0**n1 <= top) & (top < 1.5 * 2.0**n1))
    k = n1[:, None] - np.arange(2 ** (bits - 2))[None, :]
    levels = np.concatenate([-(2.0**k), np.zeros((len(n1), 1)), 2.0**k], axis=1)
    return levels.astype(dtype)
  if np.finfo(dtype).bits < 32:
    return numpy_levels(w.astype(np.float32), bits, grid).astype(dtype)
  if grid == "asymmetric":
    hi, lo = w.max(axis=0), w.min(axis=0)
    step = (hi - lo) / np.asarray(2**bits - 1, dtype)
    units = np.round(lo / step)[:, None] + np.arange(2**bits).astype(dtype)[None, :]
  else:
    half = 2 ** (bits - 1) - 1
    step = np.abs(w).max(axis=0) / np.asarray(half, dtype)
    units = np.broadcast_to(np.arange(-half, half + 1).astype(dtype), (w.shape[1], 2 * half + 1))
  return (units * step[:, None]).astype(dtype)


def on_levels(q, levels):
  """Per weight of ``q`` (d_in, d_out): whether it equals one of its column's levels."""
  q = np.asarray(q)
  return np.any(q.T[:, :, None] == levels[:, None, :], axis=-1).T


def run_pow2(w, bits):
  q = inq_jax.pow2_quantize(w, bits)
  return Outcome(q, on_levels(q, numpy_levels(w, bits, "pow2", per_channel=False)), [],
                 weight_error(q, w))


def make_run_inq(strategy):
  def run(w, bits):
    params = {"layer": {"kernel": w}}
    quantizer = inq_jax.inq(bits, strategy=strategy)
    state = quantizer.init(params)
    masks = []
    schedule = inq_jax.SCHEDULES.get(bits, (0.5, 0.75, 0.875, 1.0))
    for i, portion in enumerate(schedule):
      params, state = quantizer.step(params, state, portion,
                                     key=jax.random.key(i))
      masks.append((portion, state.frozen["layer"]["kernel"]))
    q = params["layer"]["kernel"]
    return Outcome(q, on_levels(q, numpy_levels(w, bits, "pow2", per_channel=False)),
                   masks, weight_error(q, w))
  return run


def calibration_inputs(w):
  return jax.random.normal(jax.random.key(9), (64, w.shape[0])).astype(w.dtype)


def make_run_layer_solver(make_solver, grid):
  def run(w, bits):
    result = make_solver(bits, grid=grid).quantize_layer(w, calibration_inputs(w))
    # weights[i, j] must be one of channel j's levels, rebuilt here from w.
    return Outcome(result.weights, on_levels(result.weights, numpy_levels(w, bits, grid)),
                   [], float(result.error))
  return run


UNIFORM_LEVELS = {"asymmetric": lambda bits: 2 ** bits,
                  "symmetric": lambda bits: 2 ** bits - 1, "pow2": pow2_levels}

REGISTRY = [
    Quantizer("pow2_quantize", tuple(range(2, 9)), run_pow2, pow2_levels,
              nearest_on_nested_codebooks=True),
    # Without retraining every INQ weight ends at pow2_quantize with the n1
    # of init: the same nearest rounding on nested sets.
    Quantizer("inq_magnitude", tuple(range(2, 9)), make_run_inq("magnitude"),
              pow2_levels, has_masks=True, nearest_on_nested_codebooks=True),
    Quantizer("inq_random", tuple(range(2, 9)), make_run_inq("random"),
              pow2_levels, has_masks=True, nearest_on_nested_codebooks=True),
] + [
    Quantizer(f"{name}_{grid}", tuple(range(2, 9)), make_run_layer_solver(make_solver, grid),
              UNIFORM_LEVELS[grid], idempotent=grid == "pow2",
              nearest_on_nested_codebooks=name == "rtn" and grid == "pow2")
    for name, make_solver in (("comq", comq_jax.comq), ("rtn", comq_jax.rtn))
    for grid in ("asymmetric", "symmetric", "pow2")
]

CASES = [(entry, bits) for entry in REGISTRY for bits in entry.bits]
IDS = [f"{entry.name}-{bits}bit" for entry, bits in CASES]
IDEMPOTENT_CASES = [(entry, bits) for entry, bits in CASES if entry.idempotent]
IDEMPOTENT_IDS = [f"{entry.name}-{bits}bit" for entry, bits in IDEMPOTENT_CASES]
MASK_CASES = [(entry, bits) for entry, bits in CASES if entry.has_masks]
MASK_IDS = [f"{entry.name}-{bits}bit" for entry, bits in MASK_CASES]
NESTED = [entry for entry in REGISTRY if entry.nearest_on_nested_codebooks]


def weights(dtype=jnp.float32, seed=0, shape=(6, 10)):
  return (jax.random.normal(jax.random.key(seed), shape) * 0.1).astype(dtype)


@pytest.mark.parametrize("entry,bits", CASES, ids=IDS)
def test_values_lie_in_codebook(entry, bits):
  outcome = entry.run(weights(), bits)
  assert bool(jnp.all(outcome.in_codebook))
  for channel in np.asarray(outcome.quantized).T:
    assert len(np.unique(channel)) <= entry.num_levels(bits)


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric", "pow2"])
def test_codebook_check_catches_weights_off_the_grid(grid):
  # The membership check above is not vacuous: float weights, or weights rounded onto
  # a grid one step too fine, are mostly off the levels built from the weights.
  w = np.asarray(weights(seed=4))
  assert np.mean(on_levels(w, numpy_levels(w, 4, grid))) < 0.5
  finer = np.asarray(comq_jax.rtn(bits=5, grid=grid).quantize_layer(w).weights)
  assert not np.all(on_levels(finer, numpy_levels(w, 4, grid)))


# Min-max grids are rebuilt from the quantized range (see Quantizer).
@pytest.mark.parametrize("entry,bits", IDEMPOTENT_CASES, ids=IDEMPOTENT_IDS)
def test_quantizing_twice_changes_nothing(entry, bits):
  q = entry.run(weights(), bits).quantized
  np.testing.assert_array_equal(entry.run(q, bits).quantized, q)


def check_dtype_kept(run, dtype):
  outcome = run(weights(dtype), 4)
  assert jnp.dtype(outcome.quantized.dtype) == jnp.dtype(dtype), (
      outcome.quantized.dtype, dtype)
  assert bool(jnp.all(outcome.in_codebook))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_dtype_is_kept(entry, dtype):
  check_dtype_kept(entry.run, dtype)


def test_dtype_check_catches_an_upcasting_quantizer():
  upcasting = lambda w, bits: run_pow2(w.astype(jnp.float32), bits)
  with pytest.raises(AssertionError, match="float32"):
    check_dtype_kept(upcasting, jnp.bfloat16)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_has_masks_flag_matches_the_outcome(entry):
  # A wrong flag would drop the entry from the mask test below unnoticed.
  assert bool(entry.run(weights(), 4).masks) == entry.has_masks


@pytest.mark.parametrize("entry,bits", MASK_CASES, ids=MASK_IDS)
def test_masks_only_grow_with_exact_counts(entry, bits):
  masks = entry.run(weights(), bits).masks
  assert masks and masks[-1][0] == 1.0
  previous = jnp.zeros((6, 10), bool)
  for portion, mask in masks:
    assert int(mask.sum()) == round(portion * mask.size)
    assert bool(jnp.all(mask | ~previous))
    previous = mask
  assert bool(jnp.all(previous))


@pytest.mark.parametrize("entry", NESTED, ids=lambda e: e.name)
def test_weight_error_does_not_grow_with_bits(entry):
  # Only where it is a theorem (see Quantizer.nearest_on_nested_codebooks):
  # for min-max grids and COMQ a passing seed would be luck.
  w = weights(seed=3)
  errors = [np.abs(np.asarray(entry.run(w, bits).quantized, np.float64)
                   - np.asarray(w, np.float64)) for bits in entry.bits]
  for bits, low, high in zip(entry.bits[1:], errors[:-1], errors[1:],
                             strict=True):
    assert np.all(high <= low), bits  # weight by weight
  assert errors[-1].sum() < errors[0].sum()


@pytest.mark.parametrize("bits", range(2, 8))
def test_pow2_rule_is_nearest_on_nested_sets(bits):
  # The premise of the test above, on random weights over five decades and
  # on every level and rounding threshold (0.5, 0.75, 1.5 times 2^k) down to
  # 2^-70.
  rng = np.random.default_rng(bits)
  w = rng.normal(size=4000) * 10.0 ** rng.uniform(-5, 0, 4000)
  thresholds = [c * 2.0**k for k in range(-70, 1) for c in (0.5, 0.75, 1, 1.5)]
  w = np.concatenate([w, thresholds, [-t for t in thresholds]]).astype(
      np.float32)
  n1, _ = inq_jax.pow2_exponents(jnp.max(jnp.abs(w)), bits)
  n1_wider, _ = inq_jax.pow2_exponents(jnp.max(jnp.abs(w)), bits + 1)
  assert int(n1) == int(n1_wider)
  levels = {}
  for b in (bits, bits + 1):
    n2 = int(n1) + 1 - 2 ** (b - 2)
    levels[b] = np.array([0.0] + [s * 2.0**e for e in range(n2, int(n1) + 1)
                                  for s in (1, -1)])
  assert set(levels[bits]) < set(levels[bits + 1])
  q = np.asarray(inq_jax.pow2_quantize(jnp.asarray(w), bits), np.float64)
  distance = np.abs(w.astype(np.float64)[:, None] - levels[bits][None, :])
  np.testing.assert_array_equal(np.abs(w - q), distance.min(axis=1))


@pytest.mark.parametrize("grid,bits", [("asymmetric", 2), ("symmetric", 3)])
def test_min_max_grids_are_not_nested(grid, bits):
  # Why they are left out above: 1/3 is a level of the channel [0, 1/3, 1]
  # at these bits (step 1/3) but not at one more (step 1/7), so rounding it
  # gets worse with the extra bit.
  w = jnp.array([[0.0], [1 / 3], [1.0]], jnp.float32)
  error = lambda bits: float(jnp.sum(jnp.abs(
      comq_jax.rtn(bits=bits, grid=grid).quantize_layer(w).weights - w)))
  assert error(bits) == 0.0
  assert error(bits + 1) > 0.0


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_results_are_finite(entry):
  outcome = entry.run(weights(seed=5), 3)
  assert bool(jnp.all(jnp.isfinite(outcome.quantized)))
  assert np.isfinite(outcome.error)


def check_does_not_recompile(quantize, shape):
  """The first call compiles, a second one on new values of ``shape`` not."""
  # Inputs are made outside the counted blocks: their own compilations would
  # satisfy the first count even if the quantizer compiled nothing.
  w1, w2 = weights(seed=1, shape=shape), weights(seed=2, shape=shape)
  x = jax.block_until_ready(calibration_inputs(w1))
  with helpers.count_compilations() as first:
    jax.block_until_ready(quantize(w1, x, 4))
  with helpers.count_compilations() as second:
    jax.block_until_ready(quantize(w2, x, 4))
  assert first[0] > 0, "nothing compiled: shape not new, or counter blind"
  assert second[0] == 0, f"{second[0]} compilations on the second call"


_jitted_pow2_quantize = jax.jit(inq_jax.pow2_quantize, static_argnums=1)


@pytest.mark.parametrize("quantize,shape", [
    (lambda w, x, bits: _jitted_pow2_quantize(w, bits), (7, 5)),
    (lambda w, x, bits: comq_jax.comq(bits=bits).quantize_layer(w, x).weights,
     (9, 5)),
], ids=["pow2_quantize", "comq"])
def test_quantizer_does_not_recompile(quantize, shape):
  # Shapes no other test uses, so the first call must compile.
  check_does_not_recompile(quantize, shape)


def test_recompile_check_catches_a_recompiling_quantizer():
  # A fresh jit per call compiles every time.
  fresh_jit = lambda w, x, bits: jax.jit(
      lambda w: inq_jax.pow2_quantize(w, bits))(w)
  with pytest.raises(AssertionError, match="compilations on the second call"):
    check_does_not_recompile(fresh_jit, (7, 3))
