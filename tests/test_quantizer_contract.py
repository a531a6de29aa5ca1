"""One contract suite run over every quantizer in the registry.

Each entry maps ``(weights, bits) -> (quantized, codebook_mask, frozen
masks seen along the way)``. A new quantizer registers here and inherits
every check.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inq_jax
from tests import helpers

jax.config.update("jax_disable_most_optimizations", True)


class Quantizer(NamedTuple):
  name: str
  bits: tuple
  run: Callable  # (w, bits) -> (q, in_codebook bool array, list of masks)


def run_pow2(w, bits):
  q = inq_jax.pow2_quantize(w, bits)
  n1, _ = inq_jax.pow2_exponents(jnp.max(jnp.abs(w)), bits)
  return q, inq_jax.in_codebook(q, bits, n1), []


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
    return q, inq_jax.in_codebook(q, bits, state.n1["layer"]["kernel"]), masks
  return run


REGISTRY = [
    Quantizer("pow2_quantize", tuple(range(2, 9)), run_pow2),
    Quantizer("inq_magnitude", tuple(range(2, 9)), make_run_inq("magnitude")),
    Quantizer("inq_random", tuple(range(2, 9)), make_run_inq("random")),
]

CASES = [(entry, bits) for entry in REGISTRY for bits in entry.bits]
IDS = [f"{entry.name}-{bits}bit" for entry, bits in CASES]


def weights(dtype=jnp.float32, seed=0):
  return (jax.random.normal(jax.random.key(seed), (6, 10)) * 0.1).astype(dtype)


@pytest.mark.parametrize("entry,bits", CASES, ids=IDS)
def test_values_lie_in_codebook(entry, bits):
  q, in_codebook, _ = entry.run(weights(), bits)
  assert bool(jnp.all(in_codebook))
  assert len(np.unique(np.asarray(q))) <= 2 ** (bits - 1) + 1


@pytest.mark.parametrize("entry,bits", CASES, ids=IDS)
def test_quantizing_twice_changes_nothing(entry, bits):
  q, _, _ = entry.run(weights(), bits)
  np.testing.assert_array_equal(entry.run(q, bits)[0], q)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_dtype_is_kept(entry, dtype):
  q, in_codebook, _ = entry.run(weights(dtype), 4)
  assert q.dtype == dtype
  assert bool(jnp.all(in_codebook))


@pytest.mark.parametrize("entry,bits", CASES, ids=IDS)
def test_masks_only_grow_with_exact_counts(entry, bits):
  _, _, masks = entry.run(weights(), bits)
  previous = jnp.zeros((6, 10), bool)
  for portion, mask in masks:
    assert int(mask.sum()) == round(portion * mask.size)
    assert bool(jnp.all(mask | ~previous))
    previous = mask


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_error_does_not_grow_with_bits(entry):
  w = weights(seed=3)
  errors = [float(jnp.sum((entry.run(w, bits)[0] - w) ** 2))
            for bits in entry.bits]
  assert all(b <= a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0]


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_results_are_finite(entry):
  q, _, _ = entry.run(weights(seed=5), 3)
  assert bool(jnp.all(jnp.isfinite(q)))


def test_jitted_quantizer_does_not_recompile():
  quantize = jax.jit(inq_jax.pow2_quantize, static_argnums=1)
  with helpers.count_compilations() as first:
    quantize(weights(seed=1), 4).block_until_ready()
  with helpers.count_compilations() as second:
    quantize(weights(seed=2), 4).block_until_ready()
  assert first[0] > 0 and second[0] == 0
