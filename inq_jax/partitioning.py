"""How INQ partitions each layer's weights into a frozen and a free group.

Reference: Zhou et al., ICLR 2017, Sec. 2.2 (weight partition).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import layers
from quant_core import validation

PyTree = Any

STRATEGIES = ("magnitude", "random")


def frozen_counts(params: PyTree, portion) -> PyTree:
  """``round(portion * size)`` per leaf, computed on the host in float64.

  Host arithmetic makes the count exact (Python's ``round``, ties to even);
  a traced ``portion`` falls back to the same formula in float32.
  """
  if validation.is_concrete(portion):
    value = float(np.asarray(portion))
    return jax.tree.map(
        lambda leaf: np.int32(round(value * np.size(leaf))), params)
  return jax.tree.map(
      lambda leaf: jnp.round(jnp.asarray(portion, jnp.float32) *
                             np.size(leaf)).astype(jnp.int32), params)


def partition_leaf(weights: jax.Array, frozen: jax.Array, count,
                   priority: jax.Array) -> jax.Array:
  """Extends ``frozen`` to ``count`` elements, highest ``priority`` first.

  Already frozen elements rank before all others, so the mask only grows;
  a ``count`` below the current number frozen freezes nothing new.

  Args:
    weights: the layer's weights (only their shape is used).
    frozen: bool mask of the elements frozen so far.
    count: int, total number of elements to be frozen afterwards.
    priority: float scores; larger is frozen earlier.

  Returns:
    The new bool mask.
  """
  score = jnp.where(frozen, jnp.inf, priority).reshape(-1)
  order = jnp.argsort(-score, stable=True)
  rank = jnp.zeros(score.shape, jnp.int32).at[order].set(
      jnp.arange(score.size, dtype=jnp.int32))
  return frozen | (rank < count).reshape(weights.shape)


def partition_priority(weights: jax.Array, strategy: str,
                       key: Optional[jax.Array]) -> jax.Array:
  """Scores for :func:`partition_leaf` under a partition strategy.

  ``magnitude`` is the paper's pruning-inspired rule (largest ``|w|`` first);
  ``random`` freezes a uniformly random subset.
  """
  if strategy == "magnitude":
    return jnp.abs(weights).astype(jnp.float32)
  if strategy == "random":
    return jax.random.uniform(key, weights.shape, jnp.float32)
  raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")


def partition(params: PyTree, frozen: PyTree, portion, *,
              strategy: str = "magnitude", key: Optional[jax.Array] = None,
              quantizable: Optional[layers.Predicate] = None) -> PyTree:
  """The frozen mask after the accumulated ``portion`` is reached.

  Per quantizable layer exactly ``round(portion * size)`` elements end up
  frozen: the ones already frozen plus the highest-priority free ones.
  Non-quantizable leaves stay as they are (all ``False`` in an INQ state).

  Args:
    params: parameter pytree.
    frozen: bool pytree parallel to ``params``.
    portion: accumulated portion in (0, 1].
    strategy: ``"magnitude"`` or ``"random"``.
    key: PRNG key, required for ``"random"``.
    quantizable: ``(path, leaf) -> bool`` predicate; defaults to
      :func:`quant_core.layers.default_quantizable`.

  Returns:
    The new frozen mask pytree.

  References:
    Zhou et al., ICLR 2017, Sec. 2.2.
  """
  check_strategy(strategy, key)
  validation.check_portion(portion)
  validation.check_same_structure(params, frozen, "params", "frozen mask")
  return extend_masks(params, frozen, frozen_counts(params, portion),
                      layers.quantizable_mask(params, quantizable), strategy, key)


def extend_masks(params: PyTree, frozen: PyTree, counts: PyTree,
                 selected: PyTree, strategy: str,
                 key: Optional[jax.Array]) -> PyTree:
  """Jit-able core of :func:`partition` with per-leaf target ``counts``."""
  leaves, treedef = jax.tree.flatten(params)
  frozen_leaves = treedef.flatten_up_to(frozen)
  count_leaves = treedef.flatten_up_to(counts)
  selected_leaves = treedef.flatten_up_to(selected)
  keys = (jax.random.split(key, len(leaves)) if key is not None
          else [None] * len(leaves))
  new_frozen = [
      partition_leaf(w, f, n, partition_priority(w, strategy, k))
      if sel else f
      for w, f, n, sel, k in zip(leaves, frozen_leaves, count_leaves,
                                 selected_leaves, keys, strict=True)
  ]
  return jax.tree.unflatten(treedef, new_frozen)


def check_strategy(strategy: str, key) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
  if strategy == "random" and key is None:
    raise ValueError('strategy "random" needs a PRNG key (key=...).')
