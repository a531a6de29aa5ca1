"""Overhead of INQ's frozen-update mask on one training step of a small CNN.

Times a jitted SGD step (momentum 0.9, weight decay 5e-4) with and without
the mask of ``quantizer.optimizer`` (:func:`inq_jax.inq_optimizer`), after
compilation, and prints the medians and their ratio. Both steps take the
frozen mask as an argument, so they differ only by the masking.
Run: ``python benchmarks/freeze_overhead.py``.
"""

import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import inq_jax

_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed steps per variant.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")


class SmallCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def make_step(model, tx, images, labels):
  @jax.jit
  def step(params, opt_state, frozen):
    def loss_fn(params):
      logits = model.apply({"params": params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, frozen=frozen)
    return optax.apply_updates(params, updates), opt_state
  return step


def median_step_seconds(step, params, opt_state, frozen, repeats):
  params, opt_state = jax.block_until_ready(step(params, opt_state, frozen))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    params, opt_state = jax.block_until_ready(
        step(params, opt_state, frozen))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  model = SmallCNN()
  images = jax.random.normal(jax.random.key(0), (_BATCH.value, 16, 16, 3))
  labels = jnp.arange(_BATCH.value) % 10
  params = model.init(jax.random.key(1), images)["params"]
  quantizer = inq_jax.inq(5)
  params, state = quantizer.step(params, quantizer.init(params), 0.5)
  inner = optax.chain(optax.add_decayed_weights(5e-4),
                      optax.sgd(0.01, momentum=0.9))
  # The plain optimizer accepts and ignores the mask argument.
  plain_tx = optax.with_extra_args_support(inner)
  masked_tx = quantizer.optimizer(inner)
  results = {}
  # Interleave the variants so machine noise hits both alike.
  for _ in range(3):
    for name, tx in (("plain", plain_tx), ("masked", masked_tx)):
      step = make_step(model, tx, images, labels)
      seconds = median_step_seconds(step, params, tx.init(params),
                                    state.frozen, _REPEATS.value)
      results.setdefault(name, []).append(seconds)
  plain = statistics.median(results["plain"])
  with_mask = statistics.median(results["masked"])
  print(f"device: {jax.devices()[0].device_kind}, batch {_BATCH.value}")
  print(f"train step without mask: {plain * 1e3:.3f} ms (median)")
  print(f"train step with mask:    {with_mask * 1e3:.3f} ms (median)")
  print(f"overhead ratio (with / without): {with_mask / plain:.3f}")


if __name__ == "__main__":
  app.run(main)
