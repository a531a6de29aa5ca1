"""COMQ layer solver: coordinate descent over bit-codes (and scales).

Reference: A. Zhang, Z. Yang, N. Wang, Y. Qin, J. Xin, X. Li, P. Yin,
"COMQ: A Backpropagation-Free Algorithm for Post-Training Quantization",
arXiv 2403.07134 (2024); official code AozhongZhang/COMQ (``quant.py``).

The solver minimises ``||X W - X Q||_F^2`` over ``Q`` on a per-channel grid
using only the Gram matrix ``H = X^T X`` (memory ``O(d_in^2)``, no ``N``).
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from comq_jax import grid as grid_lib
from inq_jax import validation

ORDERS = ("greedy", "cyclic")


class GramAccumulator(NamedTuple):
  """Running Gram matrix ``sum_b X_b^T X_b`` and its row count."""
  gram: jax.Array
  count: jax.Array


def _gram(x):
  x = x.astype(jnp.float32)
  return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def accumulate_gram(acc: Optional[GramAccumulator], x_batch) -> GramAccumulator:
  """Adds one calibration batch to a streamed Gram matrix (float32).

  .. math:: H \\leftarrow H + X_b^\\top X_b

  Args:
    acc: the accumulator so far, or None to start one.
    x_batch: ``(n, d_in)`` layer inputs of this batch.

  Returns:
    The updated :class:`GramAccumulator`.
  """
  x_batch = jnp.asarray(x_batch)
  if x_batch.ndim != 2:
    raise ValueError(
        f"x_batch must be 2-D (rows, d_in), got shape {x_batch.shape}.")
  validation.check_floating(x_batch, "x_batch")
  validation.check_finite(x_batch, "x_batch")
  g = _gram(x_batch)
  n = jnp.asarray(x_batch.shape[0], jnp.int32)
  if acc is None:
    return GramAccumulator(gram=g, count=n)
  if acc.gram.shape != g.shape:
    raise ValueError(
        f"x_batch has d_in={x_batch.shape[1]} but the accumulator holds a "
        f"Gram of shape {acc.gram.shape}.")
  return GramAccumulator(gram=acc.gram + g, count=acc.count + n)


class LayerQuantization(NamedTuple):
  """Result of :func:`quantize_layer` / :func:`round_to_nearest`.

  Layouts follow Flax: weight-shaped arrays are ``(d_in, d_out)`` and
  per-channel arrays have length ``d_out``.

  Attributes:
    weights: de-quantized weights, shape and dtype of ``w``;
      ``weights[i, j] == levels[j, codes[i, j]]``.
    codes: int32 index of each weight into its channel's sorted ``levels``.
    levels: ``(d_out, L)`` grid values of each channel.
    scale: ``(d_out,)`` value of one integer code step. Uniform grids decode
      as ``scale * (codes - zero_point)`` (to 1 ulp); for pow2 this is
      ``2^n1``.
    zero_point: ``(d_out,)`` int32 code of zero (``-z`` of the official grid).
    exponent: ``(d_out,)`` int32 INQ ``n1`` per channel for ``grid="pow2"``
      (pack with :func:`inq_jax.pow2.pow2_encode`), zeros otherwise.
    error: ``||X W - X weights||_F`` from the Gram, or None without data.
    history: errors after each sweep and, with ``scale_update``, after each
      scale update (``iters`` or ``2 * iters`` entries); empty for RTN.
  """
  weights: jax.Array
  codes: jax.Array
  levels: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  exponent: jax.Array
  error: Optional[jax.Array]
  history: jax.Array


def _error(delta_t, gram):
  """``sqrt(trace(D H D^T))`` for ``D = W - Q`` (rows = channels)."""
  sq = jnp.sum(delta_t * jnp.matmul(delta_t, gram,
                                    precision=jax.lax.Precision.HIGHEST))
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def _sweep(wt, qt, codes, values, gram, perm):
  """One coordinate-descent pass; every channel visits its own order.

  Keeps ``E = (W - Q) H`` (row j is ``H (w_j - q_j)``) and at step ``t``
  sets ``q_ji``, ``i = perm[j, t]``, to the grid point nearest to the exact
  1-D minimiser ``w_ji + (E_ji - H_ii (w_ji - q_ji)) / H_ii``. A dead input
  (``H_ii = 0``) does not affect the objective; it keeps the nearest grid
  point to ``w_ji`` (round-to-nearest).
  """
  rows = jnp.arange(wt.shape[0])
  diag = jnp.diagonal(gram)
  e = jnp.matmul(wt - qt, gram, precision=jax.lax.Precision.HIGHEST)
  # Q and codes live in visiting order, so step t touches column t only.
  wp = jnp.take_along_axis(wt, perm, axis=1)
  qp = jnp.take_along_axis(qt, perm, axis=1)
  cp = jnp.take_along_axis(codes, perm, axis=1)

  def step(carry, t):
    qp, cp, e = carry
    i = perm[:, t]
    w = wp[:, t]
    q_old = qp[:, t]
    h = diag[i]
    live = h > 0
    safe_h = jnp.where(live, h, jnp.ones_like(h))
    target = jnp.where(live, w + (e[rows, i] - h * (w - q_old)) / safe_h, w)
    idx, q_new = grid_lib.nearest(values, target)
    e = e + (q_old - q_new)[:, None] * gram[i]
    qp = jax.lax.dynamic_update_slice_in_dim(qp, q_new[:, None], t, axis=1)
    cp = jax.lax.dynamic_update_slice_in_dim(cp, idx[:, None], t, axis=1)
    return (qp, cp, e), None

  (qp, cp, _), _ = jax.lax.scan(step, (qp, cp, e), jnp.arange(wt.shape[1]))
  inverse = jnp.argsort(perm, axis=1)
  qt = jnp.take_along_axis(qp, inverse, axis=1)
  codes = jnp.take_along_axis(cp, inverse, axis=1)
  return qt, codes


def _update_scale(wt, codes, g, gram, granularity, is_pow2):
  """Least-squares step for fixed codes (the paper's scale update).

  Per channel ``δ_j = (u_j^T H w_j) / (u_j^T H u_j)`` with ``u_j`` the level
  units of the codes (per layer: sums over channels). pow2 steps stay powers
  of two: the objective is a convex quadratic in ``δ``, so the best power of
  two is one of the two around the unconstrained optimum. A non-positive or
  undefined optimum keeps the old step.
  """
  u = jnp.take_along_axis(g.units, codes, axis=1)
  uh = jnp.matmul(u, gram, precision=jax.lax.Precision.HIGHEST)
  num = jnp.sum(uh * wt, axis=1)
  den = jnp.sum(uh * u, axis=1)
  if granularity == "layer":
    num = jnp.broadcast_to(jnp.sum(num), num.shape)
    den = jnp.broadcast_to(jnp.sum(den), den.shape)
  ok = (den > 0) & (num > 0)
  best = jnp.where(ok, num / jnp.where(ok, den, jnp.ones_like(den)), g.step)
  exponent = g.exponent
  if is_pow2:
    lo_exp = jnp.floor(jnp.log2(best)).astype(jnp.int32)
    lo = jnp.ldexp(jnp.ones_like(best), lo_exp)
    hi = 2.0 * lo
    cost = lambda s: s * s * den - 2.0 * s * num
    pick_hi = cost(hi) < cost(lo)
    best = jnp.where(ok, jnp.where(pick_hi, hi, lo), g.step)
    exponent = jnp.where(ok, lo_exp + pick_hi.astype(jnp.int32), exponent)
  return g._replace(step=best, exponent=exponent)


@functools.partial(jax.jit, static_argnames=(
    "bits", "iters", "order", "scale_update", "scalar", "grid", "granularity"))
def solve(wt, gram, *, bits, iters, order, scale_update, scalar, grid,
          granularity):
  """Jitted COMQ core in channel-major layout; see :func:`quantize_layer`.

  Args:
    wt: ``(d_out, d_in)`` float weights.
    gram: ``(d_in, d_in)`` Gram matrix of the layer inputs.
    bits, iters, order, scale_update, scalar, grid, granularity: as in
      :func:`quantize_layer` (static).

  Returns:
    ``(qt, codes_t, grid, error, history)`` with ``qt``/``codes_t`` of shape
    ``(d_out, d_in)`` and ``grid`` a :class:`comq_jax.grid.Grid`.
  """
  gram = gram.astype(wt.dtype)
  g = grid_lib.make_grid(wt, bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar)
  d_out, d_in = wt.shape
  if order == "greedy":
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    perm = jnp.argsort(-(norms[None, :] * jnp.abs(wt)), axis=1, stable=True)
  else:
    perm = jnp.broadcast_to(jnp.arange(d_in)[None, :], (d_out, d_in))
  perm = perm.astype(jnp.int32)
  # The first sweep starts from the unrounded weights (official code).
  qt = wt
  codes = jnp.zeros(wt.shape, jnp.int32)
  history = []
  for _ in range(iters):
    qt, codes = _sweep(wt, qt, codes, g.values(), gram, perm)
    history.append(_error(wt - qt, gram))
    if scale_update:
      g = _update_scale(wt, codes, g, gram, granularity, grid == "pow2")
      qt = jnp.take_along_axis(g.values(), codes, axis=1)
      history.append(_error(wt - qt, gram))
  return qt, codes, g, history[-1], jnp.stack(history)


def _check_inputs(w, x, gram):
  """Shape, dtype and (for concrete inputs) finiteness checks."""
  if w.ndim != 2:
    raise ValueError(f"w must be 2-D (d_in, d_out), got shape {w.shape}.")
  validation.check_floating(w, "w")
  validation.check_finite(w, "w")
  d_in = w.shape[0]
  if x is not None and gram is not None:
    raise ValueError("pass either x or gram, not both.")
  if x is not None:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != d_in:
      raise ValueError(
          f"x must have shape (N, d_in={d_in}), got {x.shape}.")
    validation.check_floating(x, "x")
    validation.check_finite(x, "x")
    return _gram(x)
  if gram is not None:
    gram = jnp.asarray(gram)
    if gram.shape != (d_in, d_in):
      raise ValueError(
          f"gram must have shape ({d_in}, {d_in}), got {gram.shape}.")
    validation.check_floating(gram, "gram")
    validation.check_finite(gram, "gram")
    return gram
  return None


def _compute_dtype(w):
  return jnp.promote_types(w.dtype, jnp.float32)


def _result(w, qt, codes, g, error, history):
  return LayerQuantization(
      weights=qt.T.astype(w.dtype), codes=codes.T, levels=g.values(),
      scale=g.step * g.unit_scale, zero_point=g.zero_point,
      exponent=g.exponent, error=error, history=history)


def quantize_layer(w, x=None, *, bits: int, iters: int = 1,
                   order: str = "greedy", scale_update: bool = False,
                   scalar: float = 1.0, grid: str = "asymmetric",
                   granularity: str = "channel",
                   gram=None) -> LayerQuantization:
  """Quantizes one linear layer with COMQ coordinate descent.

  Minimises the layer reconstruction error over the grid of
  :func:`comq_jax.grid.make_grid`:

  .. math::

    \\min_{Q} \\|X W - X Q\\|_F^2 = \\sum_j (w_j - q_j)^\\top H (w_j - q_j),
    \\qquad H = X^\\top X .

  Output channels are independent for a fixed scale. Starting from
  ``Q = W`` (so the first sweep is GPFQ-like), each of ``iters`` sweeps
  visits every input coordinate once per channel, in the channel's own
  order, and sets it to the exact 1-D minimiser on the grid:

  .. math::

    q_{ji} \\leftarrow \\Pi_{G_j}\\Big(w_{ji} + \\frac{[H(w_j - q_j)]_i
        - H_{ii}(w_{ji} - q_{ji})}{H_{ii}}\\Big)

  (nearest grid point; ties to the lower value). ``order="greedy"`` visits
  coordinates by descending ``sqrt(H_ii) |w_ji|`` computed once from ``W``
  (official code); ``"cyclic"`` uses ``0..d_in-1``. With
  ``scale_update=True`` each sweep is followed by the paper's closed-form
  scale step (least squares in ``δ_j``, or one ``δ`` for
  ``granularity="layer"``), which the official code omits. No step can raise
  the objective. The defaults reproduce the official code.

  Guards: an input with ``H_ii = 0`` (dead feature) is rounded to nearest;
  a constant weight channel is represented exactly (see ``make_grid``).

  Args:
    w: ``(d_in, d_out)`` weights (Flax layout).
    x: ``(N, d_in)`` calibration inputs; or give ``gram`` instead.
    bits: bit width in 2..8.
    iters: number of sweeps ``K >= 1``.
    order: ``"greedy"`` or ``"cyclic"``.
    scale_update: alternate sweeps with least-squares scale updates.
    scalar: shrink factor λ in (0, 1] of the grid (official ``--scalar``).
    grid: ``"asymmetric"`` (official), ``"symmetric"`` or ``"pow2"``.
    granularity: ``"channel"`` or ``"layer"`` (one scale for the layer).
    gram: ``(d_in, d_in)`` ``X^T X``, e.g. from :func:`accumulate_gram`.

  Returns:
    A :class:`LayerQuantization`.

  Raises:
    ValueError: bad options or shapes, neither or both of ``x``/``gram``, or
      (for concrete inputs) NaN/inf values.
  """
  grid_lib.check_options(bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar)
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"iters must be an integer >= 1, got {iters!r}.")
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
  w = jnp.asarray(w)
  gram = _check_inputs(w, x, gram)
  if gram is None:
    raise ValueError("quantize_layer needs calibration data: x or gram.")
  dtype = _compute_dtype(w)
  qt, codes, g, error, history = solve(
      w.T.astype(dtype), gram, bits=bits, iters=iters, order=order,
      scale_update=bool(scale_update), scalar=float(scalar), grid=grid,
      granularity=granularity)
  return _result(w, qt, codes, g, error, history)


def round_to_nearest(w, x=None, *, bits: int, grid: str = "asymmetric",
                     granularity: str = "channel", scalar: float = 1.0,
                     gram=None) -> LayerQuantization:
  """Round-to-nearest baseline on the same grid as :func:`quantize_layer`.

  .. math:: q_{ji} = \\Pi_{G_j}(w_{ji})

  Args:
    w: ``(d_in, d_out)`` weights (Flax layout).
    x: optional ``(N, d_in)`` inputs, to report the error.
    bits, grid, granularity, scalar: as in :func:`quantize_layer`.
    gram: optional ``X^T X`` instead of ``x``.

  Returns:
    A :class:`LayerQuantization`; ``error`` is None without ``x``/``gram``.
  """
  grid_lib.check_options(bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar)
  w = jnp.asarray(w)
  gram = _check_inputs(w, x, gram)
  wt = w.T.astype(_compute_dtype(w))
  qt, codes, g = rtn_solve(wt, bits=bits, grid=grid, granularity=granularity,
                           scalar=float(scalar))
  error = None if gram is None else _error(wt - qt, gram.astype(wt.dtype))
  return _result(w, qt, codes, g, error, jnp.zeros((0,), wt.dtype))


@functools.partial(jax.jit,
                   static_argnames=("bits", "grid", "granularity", "scalar"))
def rtn_solve(wt, *, bits, grid, granularity, scalar):
  """Jitted round-to-nearest core in channel-major layout.

  Returns:
    ``(qt, codes_t, grid)``, see :func:`round_to_nearest`.
  """
  g = grid_lib.make_grid(wt, bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar)
  codes, qt = grid_lib.nearest(g.values(), wt)
  return qt, codes, g
