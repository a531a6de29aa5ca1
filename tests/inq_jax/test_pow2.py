"""The power-of-two rule, its code format, and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inq_jax
from tests import helpers

jax.config.update("jax_disable_most_optimizations", True)


def test_reference_cases_reproduced_exactly():
  cases = np.load(helpers.reference_file("inq_pow2_cases.npz"))
  for k in range(int(cases["n_cases"])):
    w, expected = cases[f"case{k}_w"], cases[f"case{k}_q"]
    bits, n1, n2 = (int(v) for v in cases[f"case{k}_params"])
    if k == int(cases["n_cases"]) - 1:
      # The threshold line uses a given n1, not one computed from its values.
      got = inq_jax.pow2_quantize(w, bits, n1=n1)
    else:
      got = inq_jax.pow2_quantize(w, bits)
      got_n1, got_n2 = inq_jax.pow2_exponents(np.abs(w).max(), bits)
      assert (int(got_n1), int(got_n2)) == (n1, n2), f"case {k}"
    np.testing.assert_array_equal(np.asarray(got), expected,
                                  err_msg=f"case {k}")


def test_missing_golden_data_fails_instead_of_skipping():
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    helpers.reference_file("absent.npz")


@pytest.mark.parametrize("bits", range(2, 9))
def test_thresholds_and_ties_follow_paper_rule(bits):
  n1 = 3
  n2 = n1 + 1 - 2 ** (bits - 2)
  values, expected = [], []
  for k in range(n2, n1 + 1):
    low = 0.5 * 2.0**n2 if k == n2 else 0.75 * 2.0**k
    values += [low, np.nextafter(np.float32(1.5 * 2.0**k), np.float32(0))]
    expected += [2.0**k, 2.0**k]
  # Ties at 1.5·2^k round up to 2^(k+1) below n1, clamp at n1.
  values += [1.5 * 2.0**n1, 40.0, np.nextafter(np.float32(0.5 * 2.0**n2),
                                               np.float32(0))]
  expected += [2.0**n1, 2.0**n1, 0.0]
  w = np.array(values + [-v for v in values], np.float32)
  want = np.array(expected + [-v for v in expected], np.float32)
  np.testing.assert_array_equal(
      np.asarray(inq_jax.pow2_quantize(w, bits, n1=n1)), want)


def test_exponents_match_paper_formula_and_worked_example():
  # Paper: b = 3 and n1 = -1 give n2 = -2.
  n1, n2 = inq_jax.pow2_exponents(jnp.float32(0.4), 3)
  assert (int(n1), int(n2)) == (-1, -2)
  rng = np.random.default_rng(0)
  for s in rng.uniform(1e-3, 10.0, 200).astype(np.float32):
    n1, _ = inq_jax.pow2_exponents(s, 5)
    assert int(n1) == int(np.floor(np.log2(4 * np.float64(s) / 3)))


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, "4", True, None])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError, match="bits"):
    inq_jax.pow2_quantize(jnp.ones(3), bits)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise(bad):
  with pytest.raises(ValueError, match="NaN or inf"):
    inq_jax.pow2_quantize(jnp.array([0.1, bad], jnp.float32), 4)


def test_integer_weights_raise():
  with pytest.raises(ValueError, match="floating"):
    inq_jax.pow2_quantize(jnp.array([1, 2], jnp.int32), 4)


def test_all_zero_layer_stays_zero():
  n1, _ = inq_jax.pow2_exponents(jnp.float32(0.0), 4)
  assert int(n1) == inq_jax.ZERO_LAYER_N1
  zeros = jnp.zeros((3, 4), jnp.float32)
  np.testing.assert_array_equal(inq_jax.pow2_quantize(zeros, 4), zeros)
  # Under the zero-layer n1 even a value that grew later quantizes to 0.
  grown = jnp.array([0.0, 0.3, -2.0], jnp.float32)
  np.testing.assert_array_equal(
      inq_jax.pow2_quantize(grown, 4, n1=n1), jnp.zeros(3))


@pytest.mark.parametrize("bits", range(2, 9))
def test_encode_decode_round_trip_and_code_range(bits):
  n1 = -2
  n2 = n1 + 1 - 2 ** (bits - 2)
  levels = [0.0] + [s * 2.0**e for e in range(n2, n1 + 1) for s in (1, -1)]
  q = jnp.array(levels, jnp.float32)
  codes = inq_jax.pow2_encode(q, bits, n1)
  assert codes.dtype == jnp.uint8
  assert int(codes.max()) < 2**bits
  assert len(set(np.asarray(codes).tolist())) == len(levels)
  np.testing.assert_array_equal(inq_jax.pow2_decode(codes, bits, n1), q)
  # Documented layout: sign bit on top, magnitude field e - n2 + 1 below.
  assert int(inq_jax.pow2_encode(jnp.float32(-(2.0**n2)), bits, n1)) == (
      (1 << (bits - 1)) | 1)
  assert int(inq_jax.pow2_encode(jnp.float32(2.0**n1), bits, n1)) == (
      2 ** (bits - 2))


def test_decode_keeps_requested_dtype():
  codes = jnp.array([0, 1, 2, 5], jnp.uint8)
  out = inq_jax.pow2_decode(codes, 3, 0, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                [0.0, 0.5, 1.0, -0.5])


def numpy_pow2_rule(w, bits):
  """The INQ rule (Zhou et al., ICLR 2017, Eqs. 2-4) from scratch in float64 numpy:
  n1 the integer with 0.75 * 2^n1 <= max|w| < 1.5 * 2^n1, n2 = n1 + 1 - 2^(b-2);
  |w| < 2^(n2-1) goes to 0, else to the signed power 2^k, k in [n2, n1], with
  0.75 * 2^k <= |w| < 1.5 * 2^k (clipped to n1 above)."""
  a = np.abs(np.asarray(w, np.float64))
  n1 = int(np.floor(np.log2(a.max() / 0.75)))
  assert 0.75 * 2.0**n1 <= a.max() < 1.5 * 2.0**n1
  n2 = n1 + 1 - 2 ** (bits - 2)
  k = np.clip(np.floor(np.log2(np.maximum(a, 1e-300) / 0.75)), n2, n1)
  return np.where(a < 2.0 ** (n2 - 1), 0.0, np.sign(w) * 2.0**k)


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_quantize_under_jit_follows_the_rule(bits):
  # Weights spread over about as many octaves as the set has magnitudes, so that
  # several levels and the zero band are used.
  rng = np.random.default_rng(bits)
  spread = 2.0 ** rng.uniform(-(2 ** (bits - 2)) - 1, 0, (16, 8))
  w = (rng.standard_normal((16, 8)) * spread).astype(np.float32)
  got = jax.jit(inq_jax.pow2_quantize, static_argnums=1)(jnp.asarray(w), bits)
  expected = numpy_pow2_rule(w, bits)
  np.testing.assert_array_equal(np.asarray(got, np.float64), expected)
  assert len(np.unique(expected)) >= 3 and np.any(expected == 0)
  # The golden cases (tests/data/README.md), jitted too.
  cases = np.load(helpers.reference_file("inq_pow2_cases.npz"))
  quantize = jax.jit(inq_jax.pow2_quantize, static_argnums=1, static_argnames="n1")
  for k in range(int(cases["n_cases"])):
    case_bits, n1, _ = (int(v) for v in cases[f"case{k}_params"])
    given = {"n1": n1} if k == int(cases["n_cases"]) - 1 else {}
    np.testing.assert_array_equal(
        np.asarray(quantize(cases[f"case{k}_w"], case_bits, **given)),
        cases[f"case{k}_q"], err_msg=f"case {k}")
