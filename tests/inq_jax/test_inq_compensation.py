"""INQ with less retraining: compensated steps, sensitivity-aware portions, distillation."""

import logging

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import inq_jax
import quant_core
from experiments import models
from experiments import tasks
from experiments import train
from inq_jax import compensation
from tests.experiments.test_train import tiny_config


def random_layer(seed, d_in, d_out, groups=1, rows=400):
  """Correlated inputs (a shared factor), heavy-tailed weights, float32."""
  rng = np.random.default_rng(seed)
  factor = rng.normal(size=(groups, rows, 1))
  x = rng.normal(size=(groups, rows, d_in)) + 1.5 * factor * rng.normal(size=(1, 1, d_in))
  w = 0.1 * rng.standard_t(4, size=(groups, d_in, d_out))
  gram = np.einsum("gri,grj->gij", x, x)
  return w.astype(np.float32), gram.astype(np.float32)


def masks(w, before_portion, after_portion, seed):
  """Magnitude masks of two successive portions (per group), nested."""
  order = np.argsort(-np.abs(w).reshape(w.shape[0], -1), axis=1, kind="stable")
  ranks = np.argsort(order, axis=1).reshape(w.shape)
  size = w[0].size
  before = ranks < round(before_portion * size)
  after = ranks < round(after_portion * size)
  # Random extra entries too: compensation must not rely on the magnitude order.
  extra = np.random.default_rng(seed).random(w.shape) < 0.05
  return before, after | (extra & ~before)


def objective64(w, q, gram):
  """Per-channel objective in float64, independent of the code under test."""
  d = w.astype(np.float64) - q.astype(np.float64)
  return np.einsum("gij,gik,gkj->gj", d, gram.astype(np.float64), d)


def frozen_values(w, before, bits, n1):
  """Weights with the entries of `before` already on the codebook (an earlier step)."""
  return np.where(before, np.asarray(inq_jax.pow2_quantize(w, bits, n1=n1)), w)


BOTH = inq_jax.Compensation()
CHOOSE = inq_jax.Compensation(correct=False)
CORRECT = inq_jax.Compensation(choose=False)


@pytest.mark.parametrize("settings,seed,bits,shape", [
    (BOTH, 0, 2, (48, 8, 1)), (BOTH, 1, 3, (40, 12, 2)), (BOTH, 2, 4, (64, 6, 1)),
    (BOTH, 3, 5, (33, 5, 3)), (CHOOSE, 4, 3, (40, 12, 2)), (CORRECT, 5, 4, (48, 8, 1))])
def test_compensation_never_increases_the_layer_objective(settings, seed, bits, shape):
  d_in, d_out, groups = shape
  w, gram = random_layer(seed, d_in, d_out, groups)
  n1 = inq_jax.pow2_exponents(np.max(np.abs(w)), bits)[0]
  before, after = masks(w, 0.3, 0.6, seed)
  w = frozen_values(w, before, bits, n1)
  new, plain_objective, objective = compensation.compensate_matrices(
      w, before, after, gram, n1, bits=bits, settings=settings)
  new = np.asarray(new)
  plain = np.where(after & ~before, np.asarray(inq_jax.pow2_quantize(w, bits, n1=n1)), w)
  exact_plain, exact = objective64(w, plain, gram), objective64(w, new, gram)
  np.testing.assert_allclose(plain_objective, exact_plain, rtol=1e-4)
  np.testing.assert_allclose(objective, exact, rtol=1e-4)
  # Each part is kept for a channel only if it lowered that channel's objective, as
  # computed in float32; in float64 it may then be above by rounding only.
  assert np.all(exact <= exact_plain * (1 + 1e-5))
  # ... and on these correlated layers it lowers the whole layer's objective clearly.
  # (Not at 2 bits with choose alone: with {0, ±2^n1} and n1 set by a heavy tail, every
  # 1-D minimiser of the newly frozen small weights rounds to 0, as plain INQ does.)
  assert exact.sum() < 0.97 * exact_plain.sum()
  # Earlier frozen weights are untouched, all frozen ones are on the codebook.
  np.testing.assert_array_equal(new[before], w[before])
  assert np.all(np.asarray(inq_jax.in_codebook(new, bits, n1))[after])
  if not settings.correct:  # the free weights move only with the correction
    np.testing.assert_array_equal(new[~after], w[~after])


def test_correction_is_the_damped_least_squares_update():
  w, gram = random_layer(5, 24, 4)
  bits, damp = 3, 0.01
  n1 = inq_jax.pow2_exponents(np.max(np.abs(w)), bits)[0]
  before, after = masks(w, 0.0, 0.5, 5)
  settings = inq_jax.Compensation(choose=False, damp=damp, cg_iterations=48)
  new, _, _ = compensation.compensate_matrices(w, before, after, gram, n1, bits=bits,
                                               settings=settings)
  plain = np.where(after, np.asarray(inq_jax.pow2_quantize(w, bits, n1=n1)), w)[0]
  h = gram[0].astype(np.float64)
  lam = damp * np.mean(np.diag(h))
  for j in range(w.shape[2]):
    free = ~after[0, :, j]
    d = (w[0] - plain)[:, j].astype(np.float64)
    delta = np.linalg.solve(h[np.ix_(free, free)] + lam * np.eye(free.sum()), (h @ d)[free])
    np.testing.assert_allclose(np.asarray(new)[0, free, j] - plain[free, j], delta,
                               rtol=1e-3, atol=1e-6)


def test_bad_compensation_settings_are_errors():
  with pytest.raises(ValueError, match="choose=True or correct=True"):
    inq_jax.Compensation(choose=False, correct=False)
  with pytest.raises(ValueError, match="damp must be > 0"):
    inq_jax.Compensation(damp=0.0)
  with pytest.raises(ValueError, match="sweeps must be an integer >= 1"):
    inq_jax.Compensation(sweeps=0)
  with pytest.raises(ValueError, match="sensitivity_power must be a finite number"):
    inq_jax.inq(4, sensitivity_power=-1.0)
  with pytest.raises(ValueError, match="compensation must be an inq_jax.Compensation"):
    inq_jax.inq(4, compensation=True)


@pytest.fixture(scope="module")
def cnn():
  """The digits CNN (random init) with Grams of random images, as the method builds them."""
  model = models.create_model("SmallCNN", 10)
  images = [jnp.asarray(np.random.default_rng(i).normal(size=(32, 8, 8, 1)),
                        jnp.float32) for i in range(2)]
  variables = model.init(jax.random.key(0), images[0], train=False)
  grams = quant_core.layer_grams(model, variables, images, train=False)
  views = quant_core.layer_views(model, variables, images[0], train=False)
  statistics = {path: inq_jax.LayerStatistics(views[path], acc.gram)
                for path, acc in grams.items()}
  return variables["params"], statistics


def test_data_aware_steps_need_statistics(cnn):
  params, _ = cnn
  quantizer = inq_jax.inq(4, compensation=inq_jax.Compensation())
  with pytest.raises(ValueError, match="needs the layers' calibration statistics"):
    quantizer.step(params, quantizer.init(params), 0.5)


def test_layers_without_statistics_step_plainly_and_are_named(cnn, caplog):
  params, statistics = cnn
  partial = {path: stats for path, stats in statistics.items() if path != "fc"}
  quantizer = inq_jax.inq(3, compensation=inq_jax.Compensation())
  state = quantizer.init(params)
  with caplog.at_level(logging.WARNING, logger="inq_jax.compensation"):
    stepped, new_state = quantizer.step(params, state, 0.5, statistics=partial)
  assert "fc/kernel" in caplog.text
  plain, plain_state = inq_jax.inq(3).step(params, state, 0.5)
  np.testing.assert_array_equal(stepped["fc"]["kernel"], plain["fc"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, new_state.frozen, plain_state.frozen)
  assert not np.array_equal(stepped["conv2"]["kernel"], plain["conv2"]["kernel"])


def test_compensated_schedule_ends_on_the_codebook(cnn):
  params, statistics = cnn
  quantizer = inq_jax.inq(2, compensation=inq_jax.Compensation())
  state = quantizer.init(params)
  for portion in (0.3, 0.6, 1.0):
    previous, previous_frozen = params, state.frozen
    params, state = quantizer.step(params, state, portion, statistics=statistics)
    for old, new, was in zip(jax.tree.leaves(previous), jax.tree.leaves(params),
                             jax.tree.leaves(previous_frozen), strict=True):
      np.testing.assert_array_equal(np.asarray(new)[np.asarray(was)],
                                    np.asarray(old)[np.asarray(was)])
  assert inq_jax.codebook_fraction(params, state) == 1.0


def test_sensitivity_portions_grow_masks_with_exact_counts(cnn):
  params, statistics = cnn
  quantizer = inq_jax.inq(4, sensitivity_power=1.0)
  state = quantizer.init(params)
  selected = state.quantizable_mask(params)
  sizes = [leaf.size for leaf, sel in zip(jax.tree.leaves(params),
                                          jax.tree.leaves(selected), strict=True) if sel]
  shares = []
  for portion in (0.5, 0.75, 0.875, 1.0):
    previous = state.frozen
    params, state = quantizer.step(params, state, portion, statistics=statistics)
    counts = []
    for old, new, sel in zip(jax.tree.leaves(previous), jax.tree.leaves(state.frozen),
                             jax.tree.leaves(selected), strict=True):
      old, new = np.asarray(old), np.asarray(new)
      assert not np.any(old & ~new)  # masks only grow
      if sel:
        counts.append(int(new.sum()))
      else:
        assert not new.any()
    assert sum(counts) == sum(round(portion * size) for size in sizes)
    shares.append([count / size for count, size in zip(counts, sizes, strict=True)])
  assert shares[-1] == [1.0] * len(sizes)
  # The layers do not all freeze the paper's portion: sensitivity moved the shares.
  assert max(abs(share - 0.5) for share in shares[0]) > 0.01
  assert inq_jax.codebook_fraction(params, state) == 1.0


@pytest.mark.parametrize("total,demand,room", [
    (10, [1.0, 1.0, 1.0], [5, 5, 5]), (7, [0.0, 0.0], [4, 4]),
    (9, [5.0, 0.1, 1.0], [2, 8, 8]), (0, [1.0], [3])])
def test_share_meets_the_total_within_room(total, demand, room):
  free = compensation._share(float(total), np.array(demand), np.array(room, np.float64))
  assert free.sum() == total
  assert np.all((0 <= free) & (free <= np.array(room)))
  assert np.all(free == np.round(free))


@pytest.mark.integration
def test_frozen_weights_stay_bit_identical_through_distillation(tmp_path):
  config = tiny_config(**{"inq.distill_alpha": 1.0, "inq.distill_temperature": 4.0})
  workdir = str(tmp_path)
  stop = lambda steps: configs.apply_overrides(config, {"stop_after_steps": steps})
  # 42 FP steps and the 42 of portion 0.5: stopped before entering portion 0.75.
  assert train.train_and_evaluate(stop(84), workdir) is None
  at_entry, progress = train.latest_checkpoint(workdir)
  assert (progress["phase"], progress["step_in_phase"]) == (1, 42)
  # Resumed (the teacher comes back from the checkpoint) for 20 distilled steps of
  # portion 0.75.
  assert train.train_and_evaluate(stop(20), workdir) is None
  state, progress = train.latest_checkpoint(workdir)
  assert (progress["phase"], progress["step_in_phase"]) == (2, 20)
  entry_state = inq_jax.INQState(frozen=at_entry["method"]["frozen"],
                                 n1=at_entry["method"]["n1"], bits=5, quantizable=None)
  entered, inq_state = inq_jax.inq(5).step(at_entry["variables"]["params"], entry_state,
                                           0.75)
  frozen = state["method"]["frozen"]
  jax.tree.map(np.testing.assert_array_equal, inq_state.frozen, frozen)
  moved = 0
  for entry, trained, mask in zip(jax.tree.leaves(entered),
                                  jax.tree.leaves(state["variables"]["params"]),
                                  jax.tree.leaves(frozen), strict=True):
    entry, trained, mask = np.asarray(entry), np.asarray(trained), np.asarray(mask)
    np.testing.assert_array_equal(trained[mask], entry[mask])
    moved += int(np.sum(trained[~mask] != entry[~mask]))
  assert moved > 0  # the free weights did train
  # The teacher is the FP model (the variables when portion 0.5 was entered), unchanged.
  jax.tree.map(np.testing.assert_array_equal, state["teacher"], at_entry["teacher"])
  results = train.train_and_evaluate(config, workdir)
  assert results["codebook_fraction"] == 1.0


def test_distillation_term_is_the_scaled_kl():
  config = configs.get_config("inq_5bit", "digits")
  task = tasks.create_task(config)  # SmallCNN on digits
  model = task.model
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 1)), jnp.float32)
  batch = {"image": images, "label": jnp.arange(8, dtype=jnp.int32)}
  student = model.init(jax.random.key(0), images, train=False)
  teacher = model.init(jax.random.key(1), images, train=False)
  optimizer = train.make_optimizer(config.inq, 42)
  frozen = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), student["params"])
  losses = {}
  for alpha in (0.0, 0.5):
    step = train.make_train_step(task, optimizer, (alpha, 4.0))
    state = {"variables": student, "opt_state": optimizer.init(student["params"]),
             "teacher": teacher}
    losses[alpha] = float(step(state, frozen, batch)[1]["loss"])
  logits = model.apply(student, images, train=True, mutable=["batch_stats"])[0]
  teacher_logits = model.apply(teacher, images, train=False)
  p = jax.nn.softmax(np.asarray(teacher_logits, np.float64) / 4.0)
  log_q = jax.nn.log_softmax(np.asarray(logits, np.float64) / 4.0)
  kl = float(np.mean(np.sum(p * (np.log(p) - log_q), axis=-1)))
  assert kl > 0
  np.testing.assert_allclose(losses[0.5] - losses[0.0], 0.5 * 16 * kl, rtol=1e-4)


@pytest.mark.integration
def test_ternary_options_run_end_to_end(tmp_path):
  config = tiny_config("inq_2bit", **{
      "fp.num_epochs": 0, "inq.schedule": (0.5, 1.0), "inq.compensation.choose": True,
      "inq.compensation.correct": True, "inq.sensitivity_power": 1.0,
      "inq.final_epochs": 1, "inq.bn_recalibration_batches": 4})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["codebook_fraction"] == 1.0
  assert set(results["zero_fractions"]) == {"conv1/kernel", "conv2/kernel",
                                            "conv3/kernel", "fc/kernel"}
  assert [p["portion"] for p in results["portion_accuracies"]] == [0.5, 1.0]


class MixedLayers(nn.Module):
  """A grouped conv, a DenseGeneral with a 3-D kernel and a Dense: three kinds of view."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(x)
    x = nn.DenseGeneral((2, 6), axis=-1, name="general")(x.reshape(x.shape[0], 16, 8))
    return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


def test_compensation_over_every_view_kind_lowers_each_layer_objective():
  model = MixedLayers()
  rng = np.random.default_rng(7)
  base = rng.normal(size=(48, 4, 4, 1))
  images = [jnp.asarray(base + 0.3 * rng.normal(size=(48, 4, 4, 4)), jnp.float32)]
  variables = model.init(jax.random.key(3), images[0])
  grams = quant_core.layer_grams(model, variables, images)
  views = quant_core.layer_views(model, variables, images[0])
  statistics = {path: inq_jax.LayerStatistics(views[path], acc.gram)
                for path, acc in grams.items()}
  assert set(statistics) == {"grouped", "general", "head"}
  # inq_jax.layer_statistics is that composition.
  composed = inq_jax.layer_statistics(model, variables, images)
  assert list(composed) == list(statistics)
  for path, entry in composed.items():
    assert entry.view == statistics[path].view
    np.testing.assert_array_equal(entry.gram, statistics[path].gram)
  params = variables["params"]
  compensated = inq_jax.inq(3, compensation=inq_jax.Compensation())
  state = compensated.init(params)
  stepped, new_state = compensated.step(params, state, 0.6, statistics=statistics)
  plain, _ = inq_jax.inq(3).step(params, state, 0.6)
  for path, (view, gram) in statistics.items():
    w = np.asarray(view.matrices(np.asarray(params[path]["kernel"])))
    compensated_error, plain_error = (
        objective64(w, np.asarray(view.matrices(np.asarray(kernel))), np.asarray(gram)).sum()
        for kernel in (stepped[path]["kernel"], plain[path]["kernel"]))
    assert compensated_error < plain_error, path
    frozen = np.asarray(new_state.frozen[path]["kernel"])
    assert np.all(np.asarray(inq_jax.in_codebook(stepped[path]["kernel"], 3,
                                                 new_state.n1[path]["kernel"]))[frozen])
