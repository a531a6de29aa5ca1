"""INQ as a transform on parameter pytrees: partition, step, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inq_jax
import quant_core
from tests import helpers


def make_params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return {
      "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 2, 5)) * 0.1,
               "bias": jnp.full((5,), 0.3)},
      "norm": {"scale": jnp.full((5,), 0.7), "bias": jnp.full((5,), 0.01)},
      "dense": {"kernel": jax.random.normal(keys[1], (7, 3)) * 0.2,
                "bias": jax.random.normal(keys[2], (3,))},
  }


def kernels(tree):
  return [tree["conv"]["kernel"], tree["dense"]["kernel"]]


@pytest.mark.parametrize("portion", [0.2, 0.3, 0.5, 0.7, 0.875, 0.975, 1.0])
def test_frozen_count_is_exact_per_layer(portion):
  params = make_params()
  quantizer = inq_jax.inq(4)
  _, state = quantizer.step(params, quantizer.init(params), portion)
  for mask, weights in zip(kernels(state.frozen), kernels(params), strict=True):
    assert int(mask.sum()) == round(portion * weights.size)
  assert not bool(state.frozen["conv"]["bias"].any())
  assert not bool(state.frozen["norm"]["scale"].any())


def test_magnitude_freezes_largest_free_weights_first():
  params = make_params()
  quantizer = inq_jax.inq(5)
  state = quantizer.init(params)
  params1, state1 = quantizer.step(params, state, 0.5)
  params2, state2 = quantizer.step(params1, state1, 0.75)
  for before, new, old in zip(kernels(params1), kernels(state2.frozen),
                              kernels(state1.frozen), strict=True):
    newly = np.asarray(new & ~old)
    still_free = np.asarray(~new)
    magnitudes = np.abs(np.asarray(before))
    assert magnitudes[newly].min() >= magnitudes[still_free].max()


def test_masks_only_grow_and_frozen_values_never_change():
  params = make_params()
  quantizer = inq_jax.inq(3)
  state = quantizer.init(params)
  params, state = quantizer.step(params, state, 0.4)
  # Retraining moves the free weights, even past the frozen ones in size.
  moved = jax.tree.map(lambda w, f: jnp.where(f, w, w * 3.0), params,
                       state.frozen)
  new_params, new_state = quantizer.step(moved, state, 0.6)
  for old, new, old_w, new_w in zip(kernels(state.frozen),
                                    kernels(new_state.frozen),
                                    kernels(params), kernels(new_params),
                                    strict=True):
    assert bool(jnp.all(new | ~old))
    np.testing.assert_array_equal(np.asarray(new_w)[np.asarray(old)],
                                  np.asarray(old_w)[np.asarray(old)])
  # A smaller portion freezes nothing new and unfreezes nothing.
  _, same_state = quantizer.step(new_params, new_state, 0.3)
  for a, b in zip(kernels(new_state.frozen), kernels(same_state.frozen),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_step_leaves_free_weights_and_other_leaves_untouched():
  params = make_params()
  quantizer = inq_jax.inq(4)
  new_params, state = quantizer.step(params, quantizer.init(params), 0.5)
  for old, new, mask in zip(kernels(params), kernels(new_params),
                            kernels(state.frozen), strict=True):
    free = ~np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(new)[free],
                                  np.asarray(old)[free])
  for name in ("norm",):
    for key in params[name]:
      np.testing.assert_array_equal(new_params[name][key], params[name][key])
  np.testing.assert_array_equal(new_params["dense"]["bias"],
                                params["dense"]["bias"])


def test_random_strategy_needs_key_and_depends_on_it():
  params = make_params()
  quantizer = inq_jax.inq(4, strategy="random")
  state = quantizer.init(params)
  with pytest.raises(ValueError, match="PRNG key"):
    quantizer.step(params, state, 0.5)
  _, a = quantizer.step(params, state, 0.5, key=jax.random.key(1))
  _, b = quantizer.step(params, state, 0.5, key=jax.random.key(2))
  assert int(a.frozen["dense"]["kernel"].sum()) == round(0.5 * 21)
  assert not bool(jnp.all(a.frozen["conv"]["kernel"] ==
                          b.frozen["conv"]["kernel"]))


def test_n1_fixed_at_init_so_grown_weights_clamp_instead_of_vanishing():
  params = {"dense": {"kernel": jnp.array([[0.5, 0.25], [0.1, -0.2]])}}
  quantizer = inq_jax.inq(4)
  state = quantizer.init(params)
  assert int(state.n1["dense"]["kernel"]) == -1
  grown = {"dense": {"kernel": jnp.array([[3.0, 0.25], [0.1, -5.0]])}}
  out, _ = quantizer.step(grown, state, 1.0)
  np.testing.assert_array_equal(out["dense"]["kernel"],
                                [[0.5, 0.25], [0.125, -0.5]])


def test_custom_quantizable_predicate_skips_layers():
  params = make_params()
  only_conv = lambda path, leaf: quant_core.default_quantizable(path, leaf) and (
      path[0].key == "conv")
  quantizer = inq_jax.inq(4, quantizable=only_conv)
  new_params, state = quantizer.step(params, quantizer.init(params), 1.0)
  np.testing.assert_array_equal(new_params["dense"]["kernel"],
                                params["dense"]["kernel"])
  assert not bool(state.frozen["dense"]["kernel"].any())
  assert bool(state.frozen["conv"]["kernel"].all())
  # The state's predicate, not the default, decides what is counted: the
  # float dense kernel would bring the default's fraction below 1.
  assert inq_jax.codebook_fraction(new_params, state) == 1.0


def test_all_zero_layer_stays_zero_through_inq():
  params = make_params()
  params["dense"]["kernel"] = jnp.zeros((7, 3))
  quantizer = inq_jax.inq(4)
  state = quantizer.init(params)
  assert int(state.n1["dense"]["kernel"]) == inq_jax.ZERO_LAYER_N1
  grown = jax.tree.map(lambda x: x, params)
  grown["dense"]["kernel"] = jnp.full((7, 3), 0.2)
  out, state = quantizer.step(grown, state, 1.0)
  np.testing.assert_array_equal(out["dense"]["kernel"], jnp.zeros((7, 3)))
  assert inq_jax.codebook_fraction(out, state) == 1.0


@pytest.mark.parametrize("portion", [0.0, -0.1, 1.5, float("nan")])
def test_portion_outside_unit_interval_raises(portion):
  params = make_params()
  quantizer = inq_jax.inq(4)
  with pytest.raises(ValueError, match="portion"):
    quantizer.step(params, quantizer.init(params), portion)


def test_non_finite_weights_raise_naming_the_layer():
  params = make_params()
  quantizer = inq_jax.inq(4)
  state = quantizer.init(params)
  params["conv"]["kernel"] = params["conv"]["kernel"].at[0, 0, 0, 0].set(
      jnp.nan)
  with pytest.raises(ValueError, match="conv/kernel.*NaN"):
    quantizer.init(params)
  with pytest.raises(ValueError, match="conv/kernel.*NaN"):
    quantizer.step(params, state, 0.5)


def test_mismatched_mask_structure_raises():
  params = make_params()
  quantizer = inq_jax.inq(4)
  state = quantizer.init(params)
  missing = dict(state.frozen)
  del missing["norm"]
  with pytest.raises(ValueError, match="structure"):
    quantizer.step(params, state.replace(frozen=missing), 0.5)
  wrong_shape = jax.tree.map(lambda x: x, state.frozen)
  wrong_shape["dense"]["kernel"] = jnp.zeros((3, 7), bool)
  with pytest.raises(ValueError, match="dense/kernel.*shape"):
    inq_jax.partition(params, wrong_shape, 0.5)


def test_state_carries_the_settings_and_rejects_another_quantizer():
  params = make_params()
  only_conv = lambda path, leaf: quant_core.default_quantizable(path, leaf) and (
      path[0].key == "conv")
  state = inq_jax.inq(4, quantizable=only_conv).init(params)
  assert (state.bits, state.quantizable) == (4, only_conv)
  # Static fields: they are no leaves and survive jit.
  assert len(jax.tree.leaves(state)) == 2 * len(jax.tree.leaves(params))
  through_jit = jax.jit(lambda s: s)(state)
  assert (through_jit.bits, through_jit.quantizable) == (4, only_conv)
  with pytest.raises(ValueError, match="bits=4"):
    inq_jax.inq(5, quantizable=only_conv).step(params, state, 0.5)
  with pytest.raises(ValueError, match="quantizable"):
    inq_jax.inq(4).step(params, state, 0.5)


def test_bad_strategy_raises():
  with pytest.raises(ValueError, match="strategy"):
    inq_jax.inq(4, strategy="largest")


@pytest.mark.parametrize("bits", sorted(inq_jax.SCHEDULES))
def test_named_schedule_ends_fully_quantized_and_spares_other_leaves(bits):
  params = make_params(seed=bits)
  batch_stats = {"norm": {"mean": jnp.full((5,), 0.2),
                          "var": jnp.full((5,), 1.3)}}
  variables = {"params": params, "batch_stats": batch_stats}
  quantizer = inq_jax.inq(bits)
  state = quantizer.init(variables)
  out = variables
  for portion in inq_jax.get_schedule(bits):
    out, state = quantizer.step(out, state, portion)
  assert inq_jax.codebook_fraction(out, state) == 1.0
  for w, n1 in zip(kernels(out["params"]), kernels(state.n1["params"]),
                   strict=True):
    n2 = int(n1) + 1 - 2 ** (bits - 2)
    allowed = {0.0} | {s * 2.0**e for e in range(n2, int(n1) + 1)
                       for s in (1, -1)}
    assert set(np.asarray(w).ravel().tolist()) <= allowed
  for collection, name, key in [("params", "conv", "bias"),
                                ("params", "dense", "bias"),
                                ("params", "norm", "scale"),
                                ("batch_stats", "norm", "mean"),
                                ("batch_stats", "norm", "var")]:
    np.testing.assert_array_equal(out[collection][name][key],
                                  variables[collection][name][key])


def test_schedules_match_paper_and_custom_ones_are_validated():
  assert inq_jax.SCHEDULES[5] == (0.5, 0.75, 0.875, 1.0)
  assert inq_jax.SCHEDULES[2][-2:] == (0.975, 1.0)
  assert inq_jax.validate_schedule([0.5, 1]) == (0.5, 1.0)
  for bad in ([], [0.5, 0.5, 1.0], [0.6, 0.4, 1.0], [0.5, 0.9],
              [0.0, 1.0], [0.5, 1.2], [float("nan"), 1.0]):
    with pytest.raises(ValueError):
      inq_jax.validate_schedule(bad)
  with pytest.raises(ValueError, match="schedules"):
    inq_jax.get_schedule(8)


def test_second_step_call_does_not_recompile():
  # Shapes no other test uses, so the first call must compile.
  params = {"layer": {"kernel": jnp.ones((11, 13)) * 0.1}}
  quantizer = inq_jax.inq(4)
  state = quantizer.init(params)
  with helpers.count_compilations() as first:
    params, state = quantizer.step(params, state, 0.3)
  with helpers.count_compilations() as second:
    quantizer.step(params, state, 0.6)
  assert first[0] > 0  # The counter sees compilations at all.
  assert second[0] == 0
