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

jax.config.update("jax_disable_most_optimizations", True)


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


def pow2_levels(bits):
  return 2 ** (bits - 1) + 1


def weight_error(q, w):
  return float(jnp.sum((q.astype(jnp.float32) - w.astype(jnp.float32)) ** 2))


def run_pow2(w, bits):
  q = inq_jax.pow2_quantize(w, bits)
  n1, _ = inq_jax.pow2_exponents(jnp.max(jnp.abs(w)), bits)
  return Outcome(q, inq_jax.in_codebook(q, bits, n1), [], weight_error(q, w))


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
    return Outcome(q, inq_jax.in_codebook(q, bits, state.n1["layer"]["kernel"]),
                   masks, weight_error(q, w))
  return run


def calibration_inputs(w):
  return jax.random.normal(jax.random.key(9), (64, w.shape[0])).astype(w.dtype)


def make_run_layer_solver(solve, grid):
  def run(w, bits):
    result = solve(w, calibration_inputs(w), bits=bits, grid=grid)
    # weights[i, j] must be one of channel j's levels.
    on_level = jnp.any(result.weights.T[:, :, None] == result.levels[:, None, :],
                       axis=-1).T
    return Outcome(result.weights, on_level, [], float(result.error))
  return run


UNIFORM_LEVELS = {"asymmetric": lambda bits: 2 ** bits,
                  "symmetric": lambda bits: 2 ** bits - 1, "pow2": pow2_levels}

REGISTRY = [
    Quantizer("pow2_quantize", tuple(range(2, 9)), run_pow2, pow2_levels),
    Quantizer("inq_magnitude", tuple(range(2, 9)), make_run_inq("magnitude"),
              pow2_levels),
    Quantizer("inq_random", tuple(range(2, 9)), make_run_inq("random"),
              pow2_levels),
] + [
    Quantizer(f"{name}_{grid}", tuple(range(2, 9)), make_run_layer_solver(solve, grid),
              UNIFORM_LEVELS[grid], idempotent=grid == "pow2")
    for name, solve in (("comq", comq_jax.quantize_layer),
                        ("rtn", comq_jax.round_to_nearest))
    for grid in ("asymmetric", "symmetric", "pow2")
]

CASES = [(entry, bits) for entry in REGISTRY for bits in entry.bits]
IDS = [f"{entry.name}-{bits}bit" for entry, bits in CASES]


def weights(dtype=jnp.float32, seed=0, shape=(6, 10)):
  return (jax.random.normal(jax.random.key(seed), shape) * 0.1).astype(dtype)


@pytest.mark.parametrize("entry,bits", CASES, ids=IDS)
def test_values_lie_in_codebook(entry, bits):
  outcome = entry.run(weights(), bits)
  assert bool(jnp.all(outcome.in_codebook))
  for channel in np.asarray(outcome.quantized).T:
    assert len(np.unique(channel)) <= entry.num_levels(bits)


@pytest.mark.parametrize("entry,bits", CASES, ids=IDS)
def test_quantizing_twice_changes_nothing(entry, bits):
  if not entry.idempotent:
    pytest.skip("min-max grid: rebuilt from the quantized range (see Quantizer)")
  q = entry.run(weights(), bits).quantized
  np.testing.assert_array_equal(entry.run(q, bits).quantized, q)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_dtype_is_kept(entry, dtype):
  outcome = entry.run(weights(dtype), 4)
  assert outcome.quantized.dtype == dtype
  assert bool(jnp.all(outcome.in_codebook))


@pytest.mark.parametrize("entry,bits", CASES, ids=IDS)
def test_masks_only_grow_with_exact_counts(entry, bits):
  masks = entry.run(weights(), bits).masks
  previous = jnp.zeros((6, 10), bool)
  for portion, mask in masks:
    assert int(mask.sum()) == round(portion * mask.size)
    assert bool(jnp.all(mask | ~previous))
    previous = mask


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_error_does_not_grow_with_bits(entry):
  w = weights(seed=3)
  errors = [entry.run(w, bits).error for bits in entry.bits]
  assert all(b <= a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0]


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_results_are_finite(entry):
  outcome = entry.run(weights(seed=5), 3)
  assert bool(jnp.all(jnp.isfinite(outcome.quantized)))
  assert np.isfinite(outcome.error)


@pytest.mark.parametrize("quantize", [
    jax.jit(inq_jax.pow2_quantize, static_argnums=1),
    lambda w, bits: comq_jax.quantize_layer(w, calibration_inputs(w), bits=bits).weights,
], ids=["pow2_quantize", "comq"])
def test_quantizer_does_not_recompile(quantize):
  shape = (7, 5)  # used by no other test, so the first call must compile
  with helpers.count_compilations() as first:
    quantize(weights(seed=1, shape=shape), 4).block_until_ready()
  with helpers.count_compilations() as second:
    quantize(weights(seed=2, shape=shape), 4).block_until_ready()
  assert first[0] > 0 and second[0] == 0
