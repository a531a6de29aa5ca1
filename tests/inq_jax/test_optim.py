"""Retraining with frozen weights on a small Flax CNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import inq_jax
import quant_core
from tests import helpers


class SmallCNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3, 3), strides=2)(x)
    x = nn.relu(x)
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def paper_sgd():
  return optax.chain(optax.add_decayed_weights(5e-4),
                     optax.sgd(0.05, momentum=0.9))


def assert_frozen_unchanged(before, after, frozen):
  """Frozen entries bit-identical; returns the share of free entries moved."""
  moved = total = 0
  for b, a, f in zip(jax.tree.leaves(before), jax.tree.leaves(after),
                     jax.tree.leaves(frozen), strict=True):
    b, a, f = map(np.asarray, (b, a, f))
    np.testing.assert_array_equal(a[f], b[f])
    moved += int((a[~f] != b[~f]).sum())
    total += int((~f).sum())
  return moved / total if total else 1.0


def test_frozen_weights_stay_bit_identical_over_100_sgd_steps():
  model = SmallCNN()
  images = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  labels = jnp.arange(16) % 4
  variables = model.init(jax.random.key(1), images)
  params, batch_stats = variables["params"], variables["batch_stats"]
  quantizer = inq_jax.inq(5)
  state = quantizer.init(params)
  params, state = quantizer.step(params, state, 0.5)
  after_step = params

  tx = quantizer.optimizer(paper_sgd())
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, frozen):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params, frozen=frozen)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  losses = []
  for _ in range(100):
    params, batch_stats, opt_state, loss = train_step(
        params, batch_stats, opt_state, state.frozen)
    losses.append(float(loss))
  assert losses[-1] < losses[0]

  for before, after, frozen in zip(jax.tree.leaves(after_step),
                                   jax.tree.leaves(params),
                                   jax.tree.leaves(state.frozen), strict=True):
    before, after, frozen = map(np.asarray, (before, after, frozen))
    np.testing.assert_array_equal(after[frozen], before[frozen])
    if (~frozen).any():
      assert (after[~frozen] != before[~frozen]).mean() > 0.9
  kernel_masks = [state.frozen["Conv_0"]["kernel"],
                  state.frozen["Dense_0"]["kernel"]]
  assert all(float(m.mean()) == pytest.approx(0.5, abs=0.01)
             for m in kernel_masks)


def test_without_the_mask_momentum_and_decay_move_frozen_weights():
  # The same chain without masking does move them: the mask is what holds.
  params = {"dense": {"kernel": jnp.array([[0.5, 0.3], [0.2, -0.25]])}}
  frozen = {"dense": {"kernel": jnp.array([[True, False], [False, True]])}}
  grads = {"dense": {"kernel": jnp.ones((2, 2))}}
  # The plain chain ignores the mask argument, so both get the same call.
  for tx, should_move in (
      (optax.with_extra_args_support(paper_sgd()), True),
      (inq_jax.inq_optimizer(paper_sgd()), False)):
    opt_state = tx.init(params)
    updates, _ = tx.update(grads, opt_state, params, frozen=frozen)
    moved = np.asarray(updates["dense"]["kernel"]) != 0
    assert bool(moved[0, 0]) == should_move and bool(moved[1, 1]) == should_move
    assert moved[0, 1] and moved[1, 0]


def test_non_quantizable_leaves_receive_inner_updates_untouched():
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  frozen = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  inner = paper_sgd()
  expected, _ = inner.update(grads, inner.init(params), params)
  tx = inq_jax.inq_optimizer(inner)
  got, _ = tx.update(grads, tx.init(params), params, frozen=frozen)
  np.testing.assert_array_equal(got["dense"]["bias"],
                                expected["dense"]["bias"])
  np.testing.assert_array_equal(got["dense"]["kernel"], jnp.zeros((2, 3)))


def test_quantizer_optimizer_masks_only_the_quantizers_leaves():
  # A predicate that keeps "a" in float: its frozen mask must be ignored.
  params = {"a": {"kernel": jnp.ones((2, 3))},
            "b": {"kernel": jnp.ones((2, 3))}}
  only_b = lambda path, leaf: (quant_core.default_quantizable(path, leaf)
                               and path[0].key == "b")
  frozen = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  tx = inq_jax.inq(4, quantizable=only_b).optimizer(paper_sgd())
  got, _ = tx.update(grads, tx.init(params), params, frozen=frozen)
  assert bool(jnp.all(got["a"]["kernel"] != 0))
  np.testing.assert_array_equal(got["b"]["kernel"], jnp.zeros((2, 3)))


def test_update_without_the_mask_raises():
  params = {"dense": {"kernel": jnp.ones((2, 3))}}
  tx = inq_jax.inq_optimizer(paper_sgd())
  with pytest.raises(TypeError, match="frozen"):
    tx.update(params, tx.init(params), params)


def test_mask_structure_mismatch_raises():
  params = {"dense": {"kernel": jnp.ones((2, 3))}}
  tx = inq_jax.mask_frozen_updates()
  state = tx.init(params)
  with pytest.raises(ValueError, match="shape"):
    tx.update(params, state,
              frozen={"dense": {"kernel": jnp.ones((3, 2), bool)}})
  with pytest.raises(ValueError):
    tx.update(params, state,
              frozen={"other": {"kernel": jnp.ones((2, 3), bool)}})


@pytest.mark.parametrize("shape", [(1, 3), (3,)])
def test_mask_of_a_broadcastable_wrong_shape_raises(shape):
  # A (1, 3) or (3,) mask broadcasts against a (2, 3) kernel: without a shape
  # check it would silently freeze whole columns.
  params = {"dense": {"kernel": jnp.ones((2, 3))}}
  tx = inq_jax.mask_frozen_updates()
  with pytest.raises(ValueError, match="shape"):
    tx.update(params, tx.init(params),
              frozen={"dense": {"kernel": jnp.zeros(shape, bool)}})


class TinyCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_readme_inq_loop_compiles_the_train_step_once():
  model = TinyCNN()
  # Shapes no other test uses, so the train step cannot be cached already.
  images = jax.random.normal(jax.random.key(0), (6, 7, 5, 1))
  labels = jnp.arange(6) % 3
  initial = model.init(jax.random.key(1), images)["params"]
  quantizer = inq_jax.inq(bits=5)
  # Built once, as in the README: the mask is an argument of every update.
  tx = quantizer.optimizer(
      optax.chain(optax.add_decayed_weights(5e-4),
                  optax.sgd(1e-3, momentum=0.9)))

  def make_train_step():
    @jax.jit
    def train_step(params, opt_state, frozen, batch):
      images, labels = batch
      def loss_fn(params):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean()
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params, frozen=frozen)
      return optax.apply_updates(params, updates), opt_state
    return train_step

  def inq_loop(train_step):
    params = initial
    state = quantizer.init(params)
    for portion in inq_jax.SCHEDULES[5]:
      params, state = quantizer.step(params, state, portion)
      opt_state = tx.init(params)  # momentum restarts at every step
      after_step = params
      for _ in range(3):
        params, opt_state = train_step(params, opt_state, state.frozen,
                                       (images, labels))
      # Numpy only: the checks themselves must not compile anything.
      moved = assert_frozen_unchanged(after_step, params, state.frozen)
      assert moved > 0.5, (portion, moved)
    return params, state

  # Warm-up with another train step: every other computation of the loop
  # (INQ steps, tx.init, validation) is compiled here.
  inq_loop(make_train_step())
  train_step = make_train_step()
  with helpers.count_compilations() as compiled:
    params, state = inq_loop(train_step)
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert compiled[0] == 1
  assert inq_jax.codebook_fraction(params, state) == 1.0
