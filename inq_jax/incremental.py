"""Incremental Network Quantization as a pure transform on parameter pytrees.

Reference: A. Zhou, A. Yao, Y. Guo, L. Xu, Y. Chen, "Incremental Network
Quantization: Towards Lossless CNNs with Low-Precision Weights", ICLR 2017,
Algorithm 1.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from inq_jax import partitioning as partition_lib
from inq_jax import pow2
from inq_jax import validation

PyTree = Any


class INQState(NamedTuple):
  """State of INQ, a pytree that jits and checkpoints.

  Attributes:
    frozen: bool arrays parallel to params; ``True`` marks a weight that is
      frozen at its power-of-two value. All ``False`` on leaves INQ does not
      quantize.
    n1: int32 scalar per leaf, the layer's largest exponent, fixed from the
      weights at initialisation (0 on leaves INQ does not quantize).
  """
  frozen: PyTree
  n1: PyTree


class INQ(NamedTuple):
  """The pair of pure functions returned by :func:`inq`.

  Attributes:
    init: ``params -> INQState``.
    step: ``(params, state, portion, key=None) -> (params, state)``.
  """
  init: Callable[..., INQState]
  step: Callable[..., Tuple[PyTree, INQState]]


def inq(bits: int, *, strategy: str = "magnitude",
        quantizable: Optional[partition_lib.Predicate] = None) -> INQ:
  """Incremental Network Quantization to ``bits``-bit powers of two.

  At each step with accumulated portion :math:`\\sigma_n`, every quantizable
  layer :math:`W_l` is split into a frozen group :math:`A^{(1)}_l` of
  :math:`\\mathrm{round}(\\sigma_n |W_l|)` weights and a free group
  :math:`A^{(2)}_l`; newly frozen weights are set to

  .. math::  \\hat w = \\mathrm{pow2\\_quantize}(w;\\, b, n_1)

  and stay there (masks only grow), while the free ones are retrained with
  :func:`inq_jax.inq_optimizer`. ``n1`` is computed once, at ``init``, from
  ``max|W_l|`` and then kept, so a weight that grows during retraining clamps
  to ``2^n1``. After the step with portion 1 every quantizable weight is in
  ``P = {0, ±2^n2, ..., ±2^n1}``. A layer that is all zeros at ``init`` has no
  scale: its weights quantize to 0 and it stays zero.

  Args:
    bits: bit width, an integer in 2..8.
    strategy: ``"magnitude"`` (the paper's pruning-inspired partition: largest
      ``|w|`` first) or ``"random"`` (needs a key at each step).
    quantizable: ``(key_path, leaf) -> bool`` choosing the leaves to
      quantize; defaults to :func:`inq_jax.default_quantizable` (every Conv
      and Dense kernel, first and last layers included).

  Returns:
    An :class:`INQ` of ``init`` and ``step``. ``step`` validates its inputs
    eagerly and runs a jitted core; calling it again with the same shapes
    does not recompile.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.array([[0.3, -0.05], [0.9, 0.1]]),
    ...                     "bias": jnp.zeros(2)}}
    >>> quantizer = inq(bits=3)
    >>> state = quantizer.init(params)
    >>> params, state = quantizer.step(params, state, 0.5)
    >>> params["dense"]["kernel"]
    Array([[0.5 , -0.05],
           [1.  , 0.1 ]], dtype=float32)

  References:
    Zhou et al., ICLR 2017, Algorithm 1 and Eqs. 4, 7-8.
  """
  bits = pow2.check_bits(bits)
  partition_lib.check_strategy(strategy, key=0)

  def init_fn(params: PyTree) -> INQState:
    selected = partition_lib.quantizable_mask(params, quantizable)
    check_finite_quantizable(params, selected)

    def layer_n1(leaf, sel):
      if not sel:
        return jnp.zeros((), jnp.int32)
      return pow2.pow2_exponents(jnp.max(jnp.abs(leaf)), bits)[0]

    return INQState(
        frozen=jax.tree.map(lambda leaf: jnp.zeros(jnp.shape(leaf), bool),
                            params),
        n1=jax.tree.map(layer_n1, params, selected))

  def step_fn(params: PyTree, state: INQState, portion,
              key: Optional[jax.Array] = None) -> Tuple[PyTree, INQState]:
    partition_lib.check_strategy(strategy, key)
    validation.check_portion(portion)
    validation.check_same_structure(params, state.frozen, "params",
                                    "state.frozen")
    validation.check_same_structure(
        jax.tree.map(lambda _: 0, params), jax.tree.map(lambda _: 0,
                                                        state.n1),
        "params", "state.n1")
    check_finite_quantizable(
        params, partition_lib.quantizable_mask(params, quantizable))
    counts = partition_lib.frozen_counts(params, portion)
    return _step_core(params, state, counts, key, bits=bits,
                      strategy=strategy, quantizable=quantizable)

  return INQ(init=init_fn, step=step_fn)


@functools.partial(jax.jit,
                   static_argnames=("bits", "strategy", "quantizable"))
def _step_core(params, state, counts, key, *, bits, strategy, quantizable):
  """Jitted body of an INQ step: extend the masks, quantize what is frozen.

  Module-level so that quantizers with equal settings share compilations.
  """
  selected = partition_lib.quantizable_mask(params, quantizable)
  frozen = partition_lib.extend_masks(params, state.frozen, counts, selected,
                                      strategy, key)
  params = jax.tree.map(
      lambda w, f, n1, sel: jnp.where(f, pow2.pow2_quantize(w, bits, n1=n1), w)
      if sel else w,
      params, frozen, state.n1, selected)
  return params, INQState(frozen=frozen, n1=state.n1)


def check_finite_quantizable(params: PyTree, selected: PyTree) -> None:
  """Raises ValueError naming the first quantizable leaf with NaN or inf."""
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), sel in zip(with_path, jax.tree.leaves(selected)):
    if sel:
      validation.check_floating(leaf, validation.path_name(path))
      validation.check_finite(leaf, validation.path_name(path))


def codebook_fraction(params: PyTree, state: INQState, bits: int,
                      quantizable: Optional[partition_lib.Predicate] = None
                      ) -> float:
  """Share of quantizable weights that lie exactly in their layer's ``P``.

  Args:
    params: parameter pytree.
    state: the :class:`INQState` holding each layer's ``n1``.
    bits: bit width used for the state.
    quantizable: the predicate used to build the quantizer.

  Returns:
    A float in [0, 1]; 1.0 after the final INQ step.
  """
  selected = partition_lib.quantizable_mask(params, quantizable)
  hits, total = 0, 0
  for leaf, n1, sel in zip(jax.tree.leaves(params), jax.tree.leaves(state.n1),
                           jax.tree.leaves(selected)):
    if sel:
      hits += int(jnp.sum(pow2.in_codebook(leaf, bits, n1)))
      total += int(jnp.size(leaf))
  if total == 0:
    raise ValueError("params have no quantizable leaves.")
  return hits / total
