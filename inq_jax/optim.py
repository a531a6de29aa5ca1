"""optax transforms that keep INQ's frozen weights fixed during retraining.

Reference: Zhou et al., ICLR 2017, Eq. 8.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from inq_jax import partitioning as partition_lib
from inq_jax import validation

PyTree = Any


class MaskFrozenUpdatesState(NamedTuple):
  """Holds the frozen mask as data, so a new mask never forces a recompile."""
  frozen: PyTree


def mask_frozen_updates(frozen: PyTree) -> optax.GradientTransformation:
  """Zeroes the updates of frozen elements.

  .. math::  u_{ij} \\leftarrow u_{ij} \\cdot T_{ij}, \\qquad
             T_{ij} = 1 - \\mathrm{frozen}_{ij}

  Place it last in a chain, after momentum and weight decay: masking only the
  gradients would let momentum and decay still move frozen weights. Frozen
  weights then stay bit-identical, since ``w + 0 == w``.

  Args:
    frozen: bool pytree with the structure of the params it will see.

  Returns:
    An ``optax.GradientTransformation``; its state holds ``frozen``.

  References:
    Zhou et al., ICLR 2017, Eq. 8 (update multiplied by the mask ``T``).
  """

  def init_fn(params):
    validation.check_same_structure(params, frozen, "params", "frozen mask")
    return MaskFrozenUpdatesState(frozen=jax.tree.map(jnp.asarray, frozen))

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(
        lambda u, f: jnp.where(f, jnp.zeros_like(u), u), updates, state.frozen)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def inq_optimizer(inner: optax.GradientTransformation, frozen: PyTree, *,
                  quantizable: Optional[partition_lib.Predicate] = None
                  ) -> optax.GradientTransformation:
  """``inner`` followed by :func:`mask_frozen_updates` on quantizable leaves.

  Leaves the predicate rejects (biases, normalisation parameters) are not
  selected by ``optax.masked`` and receive the inner optimizer's updates
  untouched. Rebuild this optimizer (and its state) at every INQ step so that
  momentum and the learning-rate schedule restart, as in the paper.

  Args:
    inner: the retraining optimizer, e.g.
      ``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, 0.9))``.
    frozen: the ``frozen`` field of an :class:`inq_jax.INQState`.
    quantizable: the predicate used to build the quantizer.

  Returns:
    ``optax.chain(inner, optax.masked(mask_frozen_updates(...), mask))``.
  """
  selected = partition_lib.quantizable_mask(frozen, quantizable)
  frozen_selected = jax.tree.map(
      lambda f, sel: f if sel else optax.MaskedNode(), frozen, selected)
  return optax.chain(
      inner, optax.masked(mask_frozen_updates(frozen_selected), selected))
