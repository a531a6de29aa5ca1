"""optax transforms that keep INQ's frozen weights fixed during retraining.

Reference: Zhou et al., ICLR 2017, Eq. 8.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from quant_core import paths
from quant_core import layers
from quant_core import validation

PyTree = Any


def mask_frozen_updates() -> optax.GradientTransformationExtraArgs:
  """Zeroes the updates of frozen elements; the mask is an argument of ``update``.

  .. math::  u_{ij} \\leftarrow u_{ij} \\cdot T_{ij}, \\qquad
             T_{ij} = 1 - \\mathrm{frozen}_{ij}

  ``update(updates, state, params=None, *, frozen)`` takes the current mask
  (``INQState.frozen``) as data, so one compiled train step serves every INQ
  step. Place it last in a chain, after momentum and weight decay: masking
  only the gradients would let momentum and decay still move frozen weights.
  Frozen weights then stay bit-identical, since ``w + 0 == w``. Under
  ``optax.masked`` the leaves it does not select pass unchanged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an empty state.

  References:
    Zhou et al., ICLR 2017, Eq. 8 (update multiplied by the mask ``T``).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, frozen, **extra_args):
    del params, extra_args
    # optax.masked hands over the full mask; its unselected leaves are MaskedNodes.
    unselected = lambda u: isinstance(u, optax.MaskedNode)

    def mask_leaf(path, u, f):
      if unselected(u):
        return u
      if jnp.shape(f) != jnp.shape(u) or jnp.result_type(f) != jnp.bool_:
        raise ValueError(
            f"frozen mask leaf {paths.path_name(path)} must be a bool array of "
            f"shape {jnp.shape(u)}, got {jnp.result_type(f)} {jnp.shape(f)}.")
      return jnp.where(f, jnp.zeros_like(u), u)

    validation.check_same_structure(
        jax.tree.map(lambda _: 0, updates, is_leaf=unselected),
        jax.tree.map(lambda _: 0, frozen), "updates", "frozen mask")
    updates = jax.tree_util.tree_map_with_path(mask_leaf, updates, frozen,
                                               is_leaf=unselected)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def inq_optimizer(inner: optax.GradientTransformation, *,
                  quantizable: Optional[layers.Predicate] = None
                  ) -> optax.GradientTransformationExtraArgs:
  """``inner`` followed by :func:`mask_frozen_updates` on the quantizable leaves.

  Prefer :meth:`inq_jax.INQ.optimizer`, which passes the quantizer's own
  predicate. Build it once. Call ``tx.init(params)`` again at every INQ step
  so that momentum and the learning-rate schedule restart, as in the paper,
  and pass the current mask to every update::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   frozen=inq_state.frozen)

  Leaves the predicate rejects (biases, normalisation parameters) receive the
  inner optimizer's updates untouched.

  Args:
    inner: the retraining optimizer, e.g.
      ``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, 0.9))``.
    quantizable: the quantizer's leaf predicate (None: the default).

  Returns:
    ``optax.chain(inner, optax.masked(mask_frozen_updates(), quantizable))``.
  """
  return optax.chain(inner, optax.masked(
      mask_frozen_updates(),
      lambda params: layers.quantizable_mask(params, quantizable)))
