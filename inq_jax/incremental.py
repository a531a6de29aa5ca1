"""Incremental Network Quantization as a pure transform on parameter pytrees.

Reference: A. Zhou, A. Yao, Y. Guo, L. Xu, Y. Chen, "Incremental Network
Quantization: Towards Lossless CNNs with Low-Precision Weights", ICLR 2017,
Algorithm 1.
"""

import dataclasses
import functools
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct
import optax

from inq_jax import compensation as compensation_lib
from quant_core import paths
from quant_core import layers
from inq_jax import optim
from inq_jax import partitioning as partition_lib
from quant_core import pow2
from quant_core import validation

PyTree = Any


@struct.dataclass
class INQState:
  """State of INQ, a pytree that jits and checkpoints, with its settings.

  Attributes:
    frozen: bool arrays parallel to params; ``True`` marks a weight that is
      frozen at its power-of-two value. All ``False`` on leaves INQ does not
      quantize.
    n1: int32 scalar per leaf, the layer's largest exponent, fixed from the
      weights at initialisation (0 on leaves INQ does not quantize).
    bits: static, the code width of the quantizer that made the state.
    quantizable: static, its leaf predicate (None: the default).
  """
  frozen: PyTree
  n1: PyTree
  bits: int = struct.field(pytree_node=False)
  quantizable: Optional[layers.Predicate] = struct.field(pytree_node=False)

  def quantizable_mask(self, params: PyTree) -> PyTree:
    """Static bools over ``params``: the leaves this state quantizes."""
    return layers.quantizable_mask(params, self.quantizable)


@dataclasses.dataclass(frozen=True)
class INQ:
  """Incremental Network Quantization with its settings; see :func:`inq`.

  Attributes:
    bits: bit width, 2..8.
    strategy: ``"magnitude"`` or ``"random"``.
    quantizable: ``(key_path, leaf) -> bool`` leaf predicate, or None for
      :func:`quant_core.layers.default_quantizable`.
    compensation: a :class:`inq_jax.Compensation`, or None (the paper's step).
    sensitivity_power: share each step's frozen count by layer sensitivity
      with this exponent (:func:`inq_jax.compensation.sensitivity_counts`),
      or None (every layer freezes the paper's portion).
  """
  bits: int
  strategy: str = "magnitude"
  quantizable: Optional[layers.Predicate] = None
  compensation: Optional[compensation_lib.Compensation] = None
  sensitivity_power: Optional[float] = None

  @property
  def data_aware(self) -> bool:
    """Whether :meth:`step` needs calibration ``statistics``."""
    return self.compensation is not None or self.sensitivity_power is not None

  def init(self, params: PyTree) -> INQState:
    """Empty frozen masks and each layer's ``n1`` from ``max|W_l|``."""
    selected = layers.quantizable_mask(params, self.quantizable)
    check_finite_quantizable(params, selected)

    def layer_n1(leaf, sel):
      if not sel:
        return jnp.zeros((), jnp.int32)
      return pow2.pow2_exponents(jnp.max(jnp.abs(leaf)), self.bits)[0]

    return INQState(
        frozen=jax.tree.map(lambda leaf: jnp.zeros(jnp.shape(leaf), bool),
                            params),
        n1=jax.tree.map(layer_n1, params, selected),
        bits=self.bits, quantizable=self.quantizable)

  def optimizer(self, inner: optax.GradientTransformation
                ) -> optax.GradientTransformationExtraArgs:
    """``inner`` with frozen updates zeroed (:func:`inq_jax.inq_optimizer`).

    Build it once; ``update`` takes the current mask as
    ``frozen=state.frozen``, so one compiled train step serves every step.
    """
    return optim.inq_optimizer(inner, quantizable=self.quantizable)

  def step(self, params: PyTree, state: INQState, portion,
           key: Optional[jax.Array] = None,
           statistics: Optional[Mapping[str, compensation_lib.LayerStatistics]] = None
           ) -> Tuple[PyTree, INQState]:
    """Freezes the accumulated ``portion`` of every layer at powers of two.

    Validates its inputs eagerly and runs a jitted core; calling it again
    with the same shapes does not recompile.

    Args:
      params: parameter pytree.
      state: the :class:`INQState` from :meth:`init` or the last step.
      portion: accumulated portion in (0, 1].
      key: PRNG key, required for ``strategy="random"``.
      statistics: ``{module path: LayerStatistics}`` of the current model,
        required with ``compensation`` or ``sensitivity_power``. Quantizable
        kernels without an entry take the plain step (and are logged).

    Returns:
      ``(params, state)`` after the step.
    """
    partition_lib.check_strategy(self.strategy, key)
    validation.check_portion(portion)
    if (state.bits, state.quantizable) != (self.bits, self.quantizable):
      raise ValueError(
          f"state was made by a quantizer with bits={state.bits} and "
          f"quantizable={state.quantizable}; this one has bits={self.bits} "
          f"and quantizable={self.quantizable}.")
    validation.check_same_structure(params, state.frozen, "params",
                                    "state.frozen")
    validation.check_same_structure(
        jax.tree.map(lambda _: 0, params), jax.tree.map(lambda _: 0,
                                                        state.n1),
        "params", "state.n1")
    check_finite_quantizable(
        params, layers.quantizable_mask(params, self.quantizable))
    counts = partition_lib.frozen_counts(params, portion)
    if not self.data_aware:
      return _step_core(params, state, counts, key, strategy=self.strategy)
    if statistics is None:
      raise ValueError("This INQ quantizer has compensation or sensitivity_power set: "
                       "step() needs the layers' calibration statistics "
                       "(statistics={path: LayerStatistics}).")
    selected = layers.quantizable_mask(params, self.quantizable)
    matched = compensation_lib.matched_layers(params, selected, statistics)
    if self.sensitivity_power is not None:
      plain_frozen = partition_lib.extend_masks(params, state.frozen, counts, selected,
                                                self.strategy, key)
      counts = compensation_lib.sensitivity_counts(
          params, state.frozen, plain_frozen, state.n1, counts, matched, bits=self.bits,
          power=self.sensitivity_power)
    new_params, new_state = _step_core(params, state, counts, key, strategy=self.strategy)
    if self.compensation is None:
      return new_params, new_state
    replaced = compensation_lib.compensate(
        params, state.frozen, new_state.frozen, state.n1, matched, bits=self.bits,
        settings=self.compensation)
    leaves, treedef = jax.tree.flatten(new_params)
    for index, leaf in replaced.items():
      leaves[index] = leaf
    return jax.tree.unflatten(treedef, leaves), new_state


def inq(bits: int, *, strategy: str = "magnitude",
        quantizable: Optional[layers.Predicate] = None,
        compensation: Optional[compensation_lib.Compensation] = None,
        sensitivity_power: Optional[float] = None) -> INQ:
  """Incremental Network Quantization to ``bits``-bit powers of two.

  At each step with accumulated portion :math:`\\sigma_n`, every quantizable
  layer :math:`W_l` is split into a frozen group :math:`A^{(1)}_l` of
  :math:`\\mathrm{round}(\\sigma_n |W_l|)` weights and a free group
  :math:`A^{(2)}_l`; newly frozen weights are set to

  .. math::  \\hat w = \\mathrm{pow2\\_quantize}(w;\\, b, n_1)

  and stay there (masks only grow), while the free ones are retrained with
  :meth:`INQ.optimizer`. ``n1`` is computed once, at ``init``, from
  ``max|W_l|`` and then kept, so a weight that grows during retraining clamps
  to ``2^n1``. After the step with portion 1 every quantizable weight is in
  ``P = {0, ±2^n2, ..., ±2^n1}``. A layer that is all zeros at ``init`` has no
  scale: its weights quantize to 0 and it stays zero. The state carries
  ``bits`` and ``quantizable``, so later calls (:func:`codebook_fraction`,
  packing) never take them again.

  Args:
    bits: bit width, an integer in 2..8.
    strategy: ``"magnitude"`` (the paper's pruning-inspired partition: largest
      ``|w|`` first) or ``"random"`` (needs a key at each step).
    quantizable: ``(key_path, leaf) -> bool`` choosing the leaves to
      quantize; defaults to :func:`quant_core.layers.default_quantizable` (every
      Conv and Dense kernel, first and last layers included).
    compensation: optional :class:`inq_jax.Compensation`: each step picks the
      newly frozen values and corrects the free weights from calibration
      Grams (:mod:`inq_jax.compensation`); ``step`` then takes ``statistics``.
    sensitivity_power: optional exponent: each step's frozen count is shared
      among the layers by sensitivity (the global portion stays the
      schedule's); ``step`` then takes ``statistics``.

  Returns:
    An :class:`INQ` with ``init(params)`` and ``step(params, state,
    portion, key=None)``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.array([[0.3, -0.05], [0.9, 0.1]]),
    ...                     "bias": jnp.zeros(2)}}
    >>> quantizer = inq(bits=3)
    >>> state = quantizer.init(params)
    >>> params, state = quantizer.step(params, state, 0.5)
    >>> params["dense"]["kernel"].tolist()
    [[0.5, -0.05000000074505806], [1.0, 0.10000000149011612]]
    >>> state.frozen["dense"]["kernel"].tolist()
    [[True, False], [True, False]]

  References:
    Zhou et al., ICLR 2017, Algorithm 1 and Eqs. 4, 7-8.
  """
  bits = pow2.check_bits(bits)
  partition_lib.check_strategy(strategy, key=0)
  if compensation is not None and not isinstance(compensation,
                                                 compensation_lib.Compensation):
    raise ValueError(f"compensation must be an inq_jax.Compensation or None, got "
                     f"{compensation!r}.")
  if sensitivity_power is not None and not (
      isinstance(sensitivity_power, (int, float)) and 0 <= sensitivity_power < float("inf")):
    raise ValueError(f"sensitivity_power must be a finite number >= 0 or None, got "
                     f"{sensitivity_power!r}.")
  return INQ(bits=bits, strategy=strategy, quantizable=quantizable,
             compensation=compensation, sensitivity_power=sensitivity_power)


@functools.partial(jax.jit, static_argnames=("strategy",))
def _step_core(params, state, counts, key, *, strategy):
  """Jitted body of an INQ step: extend the masks, quantize what is frozen.

  Module-level so that quantizers with equal settings share compilations.
  """
  selected = state.quantizable_mask(params)
  frozen = partition_lib.extend_masks(params, state.frozen, counts, selected,
                                      strategy, key)
  params = jax.tree.map(
      lambda w, f, n1, sel: jnp.where(
          f, pow2.pow2_quantize(w, state.bits, n1=n1), w) if sel else w,
      params, frozen, state.n1, selected)
  return params, state.replace(frozen=frozen)


def check_finite_quantizable(params: PyTree, selected: PyTree) -> None:
  """Raises ValueError naming the first quantizable leaf with NaN or inf."""
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), sel in zip(with_path, jax.tree.leaves(selected), strict=True):
    if sel:
      validation.check_floating(leaf, paths.path_name(path))
      validation.check_finite(leaf, paths.path_name(path))


def codebook_fraction(params: PyTree, state: INQState) -> float:
  """Share of quantizable weights that lie exactly in their layer's ``P``.

  Args:
    params: parameter pytree.
    state: the :class:`INQState` of ``params`` (its ``n1``, ``bits`` and
      ``quantizable``).

  Returns:
    A float in [0, 1]; 1.0 after the final INQ step.
  """
  selected = state.quantizable_mask(params)
  hits, total = 0, 0
  for leaf, n1, sel in zip(jax.tree.leaves(params), jax.tree.leaves(state.n1),
                           jax.tree.leaves(selected), strict=True):
    if sel:
      hits += int(jnp.sum(pow2.in_codebook(leaf, state.bits, n1)))
      total += int(jnp.size(leaf))
  if total == 0:
    raise ValueError("params have no quantizable leaves.")
  return hits / total
