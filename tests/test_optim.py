"""Retraining with frozen weights on a small Flax CNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import inq_jax

jax.config.update("jax_disable_most_optimizations", True)


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

  tx = inq_jax.inq_optimizer(paper_sgd(), state.frozen)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  losses = []
  for _ in range(100):
    params, batch_stats, opt_state, loss = train_step(params, batch_stats,
                                                      opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]

  frozen_leaves = jax.tree.leaves(state.frozen)
  for before, after, frozen in zip(jax.tree.leaves(after_step),
                                   jax.tree.leaves(params), frozen_leaves):
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
  for tx, should_move in ((paper_sgd(), True),
                          (inq_jax.inq_optimizer(paper_sgd(), frozen), False)):
    opt_state = tx.init(params)
    updates, _ = tx.update(grads, opt_state, params)
    moved = np.asarray(updates["dense"]["kernel"]) != 0
    assert bool(moved[0, 0]) == should_move and bool(moved[1, 1]) == should_move
    assert moved[0, 1] and moved[1, 0]


def test_non_quantizable_leaves_receive_inner_updates_untouched():
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  frozen = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  inner = paper_sgd()
  expected, _ = inner.update(grads, inner.init(params), params)
  tx = inq_jax.inq_optimizer(inner, frozen)
  got, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(got["dense"]["bias"],
                                expected["dense"]["bias"])
  np.testing.assert_array_equal(got["dense"]["kernel"], jnp.zeros((2, 3)))


def test_mask_structure_mismatch_raises():
  params = {"dense": {"kernel": jnp.ones((2, 3))}}
  frozen = {"dense": {"kernel": jnp.ones((3, 2), bool)}}
  with pytest.raises(ValueError, match="shape"):
    inq_jax.mask_frozen_updates(frozen).init(params)
