"""Data-aware INQ steps: error compensation and sensitivity-aware portions.

Both options read each layer's calibration Gram ``H = X^T X`` over its 2-D view
(``(groups, d_in, d_out)`` matrices, :mod:`quant_core.layers`) and measure a step by
the layer objective

.. math::  E(W') = \\operatorname{tr}\\big((W - W')^T H (W - W')\\big)
           = \\lVert X W - X W' \\rVert_F^2,

where ``W`` are the layer's weights before the step. Neither uses a gradient of
the loss.

* **Compensation** (:class:`Compensation`). (a) The newly frozen weights take
  their power-of-two values by coordinate descent on ``E`` with every other
  weight held, starting from INQ's rounding; (b) the still-free weights ``R``
  then move by the least-squares correction of the newly frozen ones ``F``,

  .. math::  W_R \\leftarrow W_R + (H_{RR} + \\lambda I)^{-1} H_{RF} (W_F - Q_F),
             \\qquad \\lambda = \\text{damp} \\cdot \\operatorname{mean}(\\operatorname{diag} H),

  the OBS / GPTQ update (Hassibi & Stork, 1993; Frantar et al., ICLR 2023) for
  a free set that differs per output channel. It is solved for all channels at
  once by conjugate gradients, which lowers the damped quadratic at every
  iteration; each part is kept for a channel only where it lowered that
  channel's objective, so a compensated step never has a larger ``E`` than the
  plain INQ step.
* **Sensitivity-aware portions** (:func:`sensitivity_counts`). The layers share
  the global frozen count of the paper's portion; a layer whose next portion
  costs more objective per weight freezes sooner, while the network still has
  retraining steps to absorb its error, and the cheap layers stay free longer,
  so that the final step, which retrains nothing, quantizes mostly them.
"""

import dataclasses
import functools
import logging
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import capture
from quant_core import layers
from quant_core import paths
from quant_core import pow2

PyTree = Any

_LOG = logging.getLogger(__name__)
_HIGHEST = jax.lax.Precision.HIGHEST


class LayerStatistics(NamedTuple):
  """What the data-aware options know of one layer.

  Attributes:
    view: the layer's 2-D view (:func:`quant_core.layers.layer_views`).
    gram: ``(groups, d_in, d_in)`` Gram of its input rows
      (e.g. ``quant_core.layer_grams(...)[path].gram``).
  """
  view: layers.LinearView
  gram: jax.Array


def layer_statistics(model_or_apply: Any, variables, calibration_batches, *,
                     row_masks=None, mesh=None, microbatch=None,
                     **apply_kwargs) -> dict:
  """``{path: LayerStatistics}`` of every supported layer on calibration batches.

  The Grams come from :func:`quant_core.layer_grams` and the views from
  :func:`quant_core.layer_views` (the first batch's shapes), under the current
  ``variables``: call it before each data-aware step.

  Args:
    model_or_apply: a linen module, an ``apply_fn(variables, batch, **kwargs)``,
      or an NNX module (``variables`` then ignored).
    variables: the model's variables, e.g. ``{"params": params}``.
    calibration_batches: model inputs.
    row_masks, mesh, microbatch: as in :func:`quant_core.layer_grams`.
    **apply_kwargs: passed to every apply (e.g. ``train=False``).

  Returns:
    ``{"/"-joined path: LayerStatistics}``, for :meth:`inq_jax.INQ.step`.
  """
  grams = capture.layer_grams(model_or_apply, variables, calibration_batches,
                              row_masks=row_masks, mesh=mesh, microbatch=microbatch,
                              **apply_kwargs)
  first = calibration_batches[0]
  views = layers.layer_views(model_or_apply, variables, first, **apply_kwargs)
  return {path: LayerStatistics(views[path], acc.gram) for path, acc in grams.items()}


@dataclasses.dataclass(frozen=True)
class Compensation:
  """Settings of error-compensated INQ steps.

  Attributes:
    choose: (a) pick the newly frozen values by coordinate descent.
    correct: (b) move the free weights by the damped least-squares correction.
    damp: ``λ / mean(diag H)`` of the correction (GPTQ's 1%); must be > 0.
    sweeps: coordinate-descent passes over the newly frozen weights.
    cg_iterations: conjugate-gradient iterations of the correction.
  """
  choose: bool = True
  correct: bool = True
  damp: float = 0.01
  sweeps: int = 2
  cg_iterations: int = 64

  def __post_init__(self):
    if not (self.choose or self.correct):
      raise ValueError("Compensation needs choose=True or correct=True.")
    if not self.damp > 0:
      raise ValueError(f"Compensation.damp must be > 0, got {self.damp}.")
    for name in ("sweeps", "cg_iterations"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Compensation.{name} must be an integer >= 1, got {value!r}.")


def layer_objective(w, w_new, gram):
  """Per-channel objective ``diag((W - W')^T H (W - W'))`` of ``(d_in, d_out)``
  matrices; shape ``(d_out,)``."""
  diff = w - w_new
  return jnp.sum(diff * jnp.matmul(gram, diff, precision=_HIGHEST), axis=0)


def _choose(w, q, new, gram, n1, bits, sweeps):
  """Coordinate descent on the newly frozen entries ``new`` of ``q``.

  Entry ``(i, j)`` moves to the power of two nearest the exact 1-D minimiser
  ``q_ij + r_ij / H_ii``, ``r = H (W - Q)``; INQ's rounding rule is nearest in
  value, so it is that grid point.
  """
  residual = jnp.matmul(gram, w - q, precision=_HIGHEST)
  diag = jnp.diagonal(gram)

  def coordinate(k, carry):
    q, residual = carry
    i = k % w.shape[0]
    h = diag[i]
    live = new[i] & (h > 0)
    target = q[i] + residual[i] / jnp.where(h > 0, h, 1.0)
    moved = jnp.where(live, pow2.pow2_quantize(target, bits, n1=n1), q[i])
    residual = residual - gram[:, i, None] * (moved - q[i])[None, :]
    return q.at[i].set(moved), residual

  q, _ = jax.lax.fori_loop(0, sweeps * w.shape[0], coordinate, (q, residual))
  return q


def _correct(w, q, free, gram, damp, iterations):
  """Damped least-squares move of the ``free`` entries of ``q`` (see module)."""
  scale = jnp.mean(jnp.diagonal(gram))
  lam = damp * jnp.where(scale > 0, scale, 1.0)
  m = free.astype(w.dtype)
  rhs = m * jnp.matmul(gram, w - q, precision=_HIGHEST)

  def operator(x):  # each column j: (M_j H M_j + λ M_j + I - M_j) x_j
    return m * (jnp.matmul(gram, m * x, precision=_HIGHEST) + lam * x) + (1 - m) * x

  inverse_diag = 1.0 / (m * (jnp.diagonal(gram)[:, None] + lam) + (1 - m))

  def cg_step(_, carry):
    x, r, z, p, rz = carry
    ap = operator(p)
    pap = jnp.sum(p * ap, axis=0)
    alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)[None, :]
    x = x + alpha * p
    r = r - alpha * ap
    z = inverse_diag * r
    rz_new = jnp.sum(r * z, axis=0)
    beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)[None, :]
    return x, r, z, z + beta * p, rz_new

  z = inverse_diag * rhs
  start = (jnp.zeros_like(rhs), rhs, z, z, jnp.sum(rhs * z, axis=0))
  delta = jax.lax.fori_loop(0, iterations, cg_step, start)[0]
  return q + m * delta


@functools.partial(jax.jit, static_argnames=("bits", "settings"))
def compensate_matrices(w, frozen_before, frozen_after, gram, n1, *, bits: int,
                        settings: Optional[Compensation]):
  """One compensated INQ step of a layer's view matrices.

  Args:
    w: ``(groups, d_in, d_out)`` weights before the step.
    frozen_before, frozen_after: bool masks of the same shape; the entries of
      ``frozen_before`` already hold their power-of-two values.
    gram: ``(groups, d_in, d_in)`` Gram of the layer's input rows.
    n1: the layer's int32 largest exponent.
    bits: INQ bit width.
    settings: a :class:`Compensation`, or None for the plain step only.

  Returns:
    ``(w_new, plain_objective, objective)``: the new matrices (entries of
    ``frozen_after`` in the codebook, those of ``frozen_before`` unchanged),
    and the layer objectives ``(groups, d_out)`` of the plain INQ step and of
    this one.
  """
  gram = gram.astype(w.dtype)

  def one_group(w, before, after, gram):
    new = after & ~before
    plain = jnp.where(new, pow2.pow2_quantize(w, bits, n1=n1), w)
    plain_objective = layer_objective(w, plain, gram)
    q, objective = plain, plain_objective
    if settings is not None and settings.choose:
      chosen = _choose(w, plain, new, gram, n1, bits, settings.sweeps)
      chosen_objective = layer_objective(w, chosen, gram)
      better = chosen_objective < objective
      q = jnp.where(better[None, :], chosen, q)
      objective = jnp.where(better, chosen_objective, objective)
    if settings is not None and settings.correct:
      corrected = _correct(w, q, ~after, gram, settings.damp, settings.cg_iterations)
      corrected_objective = layer_objective(w, corrected, gram)
      better = corrected_objective < objective
      q = jnp.where(better[None, :], corrected, q)
      objective = jnp.where(better, corrected_objective, objective)
    return q, plain_objective, objective

  return jax.vmap(one_group)(w, frozen_before, frozen_after, gram)


def matched_layers(params: PyTree, selected: PyTree,
                   statistics: Mapping[str, LayerStatistics]) -> dict:
  """``{leaf index: (module path, LayerStatistics)}`` of the selected kernels
  with statistics; logs the selected leaves without (they step as plain INQ)."""
  matched, missing = {}, []
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  for index, ((path, _), sel) in enumerate(zip(with_path, jax.tree.leaves(selected),
                                               strict=True)):
    module = paths.path_name(path[:-1])
    if sel and paths.path_name(path[-1:]) == "kernel" and module in statistics:
      matched[index] = (module, statistics[module])
    elif sel:
      missing.append(paths.path_name(path))
  if missing:
    _LOG.warning("No calibration statistics for %s: plain INQ step there.",
                 ", ".join(missing))
  return matched


def compensate(params: PyTree, frozen_before: PyTree, frozen_after: PyTree,
               n1: PyTree, matched: dict, *, bits: int, settings: Compensation):
  """The compensated leaves of a step: ``{leaf index: new leaf}``."""
  leaves = jax.tree.leaves(params)
  before, after, exponents = (jax.tree.leaves(t) for t in (frozen_before, frozen_after, n1))
  out = {}
  for index, (name, stats) in matched.items():
    # Host arrays: every step calls the jitted solve with the same kind of input.
    view, kernel = stats.view, np.asarray(leaves[index])
    matrices = view.matrices(kernel)
    if tuple(stats.gram.shape) != (matrices.shape[0], matrices.shape[1], matrices.shape[1]):
      raise ValueError(f"{name}: Gram of shape {tuple(stats.gram.shape)} does not fit "
                       f"the layer's view matrices {tuple(matrices.shape)}.")
    new, _, _ = compensate_matrices(
        matrices, view.matrices(np.asarray(before[index])),
        view.matrices(np.asarray(after[index])), np.asarray(stats.gram),
        np.asarray(exponents[index]), bits=bits, settings=settings)
    out[index] = view.kernel(new).astype(kernel.dtype)
  return out


def sensitivity_counts(params: PyTree, frozen: PyTree, plain_frozen: PyTree, n1: PyTree,
                       plain_counts: PyTree, matched: dict, *, bits: int,
                       power: float) -> PyTree:
  """Per-layer frozen counts that share the paper's global count by sensitivity.

  A layer's sensitivity is the relative objective increase per weight of its
  plain next portion, ``s_l = E_l(plain step) / (tr(W^T H W) |N_l|)``, with
  ``N_l`` the weights the plain step freezes. With ``v_l = (s̄ / s_l)^power``
  (``s̄`` the size-weighted mean; the ratio clipped to [1e-6, 1e6]), layer
  ``l`` keeps ``min(t v_l size_l, size_l - frozen_l)`` weights free, ``t``
  chosen so that the free counts add up to those of the plain portion over
  these layers; integer counts by largest remainder. Sensitive layers thus
  freeze sooner (measured on digits: the opposite rule, more free weights for
  sensitive layers, leaves their largest share to the final, untrained step
  and lost 6 to 15 points at 3-5 bits). Counts never fall below what is
  already frozen (masks only grow), and a portion of 1 freezes everything.

  Args:
    params, frozen, n1: the parameters and the INQ state's masks and exponents.
    plain_frozen: the masks of the plain step (the paper's counts).
    plain_counts: the paper's count per leaf (``round(portion * size)``).
    matched: :func:`matched_layers`; other leaves keep their plain count.
    bits: INQ bit width.
    power: the exponent of the weights (0 gives every layer the same share).

  Returns:
    The counts pytree.
  """
  leaves = jax.tree.leaves(params)
  before, after, exponents = (jax.tree.leaves(t) for t in (frozen, plain_frozen, n1))
  counts, treedef = jax.tree.flatten(plain_counts)
  counts = [int(c) for c in counts]
  indices = sorted(matched)
  if not indices:
    return plain_counts
  sizes = np.array([leaves[i].size for i in indices], np.float64)
  already = np.array([int(jnp.sum(before[i])) for i in indices], np.float64)
  plain = np.array([counts[i] for i in indices], np.float64)
  sensitivity = np.zeros(len(indices))
  for k, i in enumerate(indices):
    view, gram = matched[i][1]
    newly = int(jnp.sum(after[i])) - int(already[k])
    w = view.matrices(leaves[i])
    _, increase, _ = compensate_matrices(
        w, view.matrices(before[i]), view.matrices(after[i]), gram, exponents[i],
        bits=bits, settings=None)
    total = float(jnp.sum(jax.vmap(layer_objective)(w, jnp.zeros_like(w),
                                                    gram.astype(w.dtype))))
    if newly > 0 and total > 0:
      sensitivity[k] = float(jnp.sum(increase)) / total / newly
  mean = np.sum(sizes * sensitivity) / np.sum(sizes)
  ratio = np.clip(sensitivity / mean, 1e-6, 1e6) if mean > 0 else np.ones_like(sensitivity)
  weights = ratio ** -power
  free = _share(float(np.sum(sizes - plain)), weights * sizes, sizes - already)
  for k, i in enumerate(indices):
    counts[i] = np.int32(sizes[k] - free[k])
  return jax.tree.unflatten(treedef, counts)


def _share(total: float, demand: np.ndarray, room: np.ndarray) -> np.ndarray:
  """Integers ``f_l <= room_l`` summing to ``total``, ``f_l`` near ``min(t demand_l,
  room_l)`` for the ``t`` that meets the total (bisection, then largest remainder)."""
  if total <= 0:
    return np.zeros_like(room)
  if np.sum(room) < total:
    raise ValueError("Fewer free weights than the portion leaves free.")
  low, high = 0.0, 1.0
  while np.sum(np.minimum(high * demand, room)) < total and high < 1e300:
    high *= 2.0
  if np.sum(np.minimum(high * demand, room)) < total:  # zero demand: fill by room
    demand, low, high = room.astype(np.float64), 0.0, 1.0
  for _ in range(200):
    mid = 0.5 * (low + high)
    low, high = (mid, high) if np.sum(np.minimum(mid * demand, room)) < total else (low, mid)
  target = np.minimum(high * demand, room)
  free = np.floor(target)
  remainder = int(round(total - np.sum(free)))
  order = np.argsort(-(target - free), kind="stable")
  for k in order:
    if remainder <= 0:
      break
    if free[k] < room[k]:
      free[k] += 1
      remainder -= 1
  if remainder > 0:  # rounding left some: give them where room remains
    for k in np.argsort(-(room - free), kind="stable"):
      take = min(remainder, room[k] - free[k])
      free[k] += take
      remainder -= take
  return free
