"""MagR: weight-magnitude reduction before quantization.

MagR changes a layer's float weights, before any solver quantizes them, so that each
output channel has a smaller largest magnitude while the layer output ``X W`` barely
moves. A narrower range gives a finer grid for the same number of bits. The result is
plain float weights of the same shape: nothing changes at inference time.

Reference: A. Zhang, N. Wang, Y. Deng, X. Li, Z. Yang, P. Yin, "MagR: Weight
Magnitude Reduction for Enhancing Post-Training Quantization", NeurIPS 2024,
arXiv 2406.00800; official code AozhongZhang/MagR.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from comq_jax import objective
from quant_core import grids
from quant_core import validation

_HIGHEST = jax.lax.Precision.HIGHEST


# Bisection steps before the exact threshold iteration of project_l1_ball: they narrow the
# bracket 256-fold, so that one or two exact steps remain (each step is one pass, as a
# bisection step is; measured fastest among 0, 4, 8 and 20 on MagR's rows).
_BISECTION_STEPS = 8


def project_l1_ball(v, radius=1.0):
  """Euclidean projection of each row (last axis) of ``v`` onto an l1 ball.

  .. math:: P(v) = \\arg\\min_{\\|u\\|_1 \\le r} \\|u - v\\|_2
    = \\operatorname{sign}(v) \\max(|v| - \\theta, 0)

  with the threshold :math:`\\theta \\ge 0` the root of
  :math:`f(\\theta) = \\sum_i \\max(|v_i| - \\theta, 0) - r` (Duchi,
  Shalev-Shwartz, Singer, Chandra, ICML 2008); a row already inside the ball gets
  :math:`\\theta = 0` and is returned unchanged. Without sorting (a sort per row
  and step dominates MagR's time on CPU): a few bisection steps on
  :math:`[0, \\max_i |v_i|]` give :math:`\\theta_0 \\le \\theta`, then the exact
  iteration of Michelot (1986),

  .. math:: A_k = \\{i : |v_i| > \\theta_k\\}, \\qquad
    \\theta_{k+1} = \\frac{\\sum_{i \\in A_k} |v_i| - r}{|A_k|},

  rises monotonically to the threshold and stops when it no longer changes (the
  active set shrinks at every other step, so it ends in at most ``n`` steps; after
  the bisection, in one or two).

  Args:
    v: ``(..., n)`` float array, ``n >= 1``.
    radius: ball radius ``r > 0``.

  Returns:
    The projection, shape and dtype of ``v``.
  """
  mag = jnp.abs(v)
  return jnp.sign(v) * jnp.maximum(mag - l1_threshold(mag, radius), 0)


def l1_threshold(mag, radius):
  """The threshold :math:`\\theta` of :func:`project_l1_ball` for magnitudes
  ``mag >= 0`` (rows on the last axis), keepdims; 0 for a row inside the ball."""
  total = jnp.sum(mag, axis=-1, keepdims=True)
  excess = lambda theta: jnp.sum(jnp.maximum(mag - theta, 0), axis=-1, keepdims=True)

  def bisect(_, bounds):
    low, high = bounds
    middle = 0.5 * (low + high)
    above = excess(middle) > radius  # the root lies above the middle
    return jnp.where(above, middle, low), jnp.where(above, high, middle)

  low, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, bisect,
                             (jnp.zeros_like(total), jnp.max(mag, axis=-1, keepdims=True)))

  def exact_step(theta):
    active = mag > theta
    count = jnp.sum(active, axis=-1, keepdims=True).astype(mag.dtype)
    summed = jnp.sum(jnp.where(active, mag, 0), axis=-1, keepdims=True)
    # Never below the last iterate: float rounding must not undo the monotone rise.
    return jnp.maximum((summed - radius) / jnp.maximum(count, 1), theta)

  def changed(state):
    theta, previous, steps = state
    return jnp.any(theta != previous) & (steps < mag.shape[-1])

  def step(state):
    theta, _, steps = state
    return exact_step(theta), theta, steps + 1

  theta, _, _ = jax.lax.while_loop(changed, step, (exact_step(low), low, 0))
  return jnp.where(total > radius, jnp.maximum(theta, 0), 0)


def prox_linf(v, t):
  """Proximal map of ``t * ||.||_inf`` on each row (last axis) of ``v``.

  By the Moreau decomposition (the dual norm of l-infinity is l1),

  .. math:: \\operatorname{prox}_{t\\|\\cdot\\|_\\infty}(v)
    = v - t\\, P_{\\{\\|u\\|_1 \\le 1\\}}(v / t)
    = v - P_{\\{\\|u\\|_1 \\le t\\}}(v)
    = \\operatorname{sign}(v) \\min(|v|, \\tau),

  with :math:`\\tau` the threshold of the projection onto the ball of radius ``t``
  (:func:`l1_threshold`; 0 when :math:`\\|v\\|_1 \\le t`): the entries above
  :math:`\\tau` are clipped to it, the others kept. Computed in that last form,
  without the cancellation of ``v - t P(v / t)``. ``t = 0`` gives ``v``.
  """
  positive = t > 0
  mag = jnp.abs(v)
  clipped = jnp.sign(v) * jnp.minimum(mag, l1_threshold(mag, jnp.where(positive, t, 1)))
  return jnp.where(positive, clipped, v)


def prox_group_linf(v, t, group_size=None):
  """Proximal map of ``t * sum_g ||v_g||_inf`` over groups of ``group_size``
  consecutive entries of each row (the whole row without groups; a last group of
  fewer entries takes the rest).

  The penalty is separable over groups, so the map is :func:`prox_linf` on each
  group; zero padding of a short last group changes nothing (a zero entry stays
  zero and does not change the l1 threshold of the others).
  """
  if group_size is None:
    return prox_linf(v, t)
  d_out, d_in = v.shape
  groups = grids.num_groups(d_in, group_size)
  padded = jnp.pad(v, ((0, 0), (0, groups * group_size - d_in)))
  out = prox_linf(padded.reshape(d_out, groups, group_size), t)
  return out.reshape(d_out, -1)[:, :d_in]


@functools.partial(jax.jit, static_argnames=("iters", "group_size"))
def solve_channel_major(wt0, gram, alpha, *, iters, group_size=None):
  """:func:`magr` on channel-major ``(d_out, d_in)`` weights, traced (no checks)."""
  gram = 0.5 * (gram + gram.T)
  top = jnp.linalg.eigvalsh(gram)[-1]
  h = gram / jnp.where(top > 0, top, 1)

  def step(_, wt):
    grad = jnp.matmul(wt - wt0, h, precision=_HIGHEST)
    return prox_group_linf(wt - grad, alpha, group_size)

  # Inputs that are all zero leave nothing to keep: the weights stay as they are.
  return jnp.where(top > 0, jax.lax.fori_loop(0, iters, step, wt0), wt0)


def magr(w, gram, *, alpha=1e-3, iters=200, group_size=None) -> jax.Array:
  """Reduces each output channel's largest weight magnitude, keeping ``X W``.

  For each output channel (column) ``w0`` of ``w``, MagR approximately solves

  .. math:: \\min_w \\tfrac12 (w - w_0)^\\top \\hat H (w - w_0)
    + \\alpha \\|w\\|_\\infty, \\qquad \\hat H = H / \\lambda_{\\max}(H),
    \\quad H = X^\\top X,

  i.e. ``1/2 ||X w - X w0||^2 + alpha * lambda_max(H) * ||w||_inf`` in the raw
  Gram, by ``iters`` proximal gradient steps from ``w = w0`` with step
  ``1 / lambda_max(H_hat) = 1``:

  .. math:: w \\leftarrow \\operatorname{prox}_{\\alpha\\|\\cdot\\|_\\infty}
    \\bigl(w - \\hat H (w - w_0)\\bigr),
    \\qquad \\operatorname{prox}_{t\\|\\cdot\\|_\\infty}(v)
    = v - t\\, P_{\\{\\|u\\|_1 \\le 1\\}}(v / t)

  (:func:`prox_linf`, :func:`project_l1_ball`).

  Choices, after the paper and its official code: the Gram is normalized by its
  largest eigenvalue and not damped (the code scales ``X`` so that its largest
  singular value is 1), so the step is 1 and ``alpha`` is independent of the scale
  of the inputs; the defaults ``alpha = 1e-3`` and 200 iterations are those
  published for per-channel quantization (the code's README: more iterations are
  better, 200 balance quality and time). ``alpha`` is in the units of the weights:
  each proximal map moves a channel by at most ``alpha`` in l1 norm, so ``alpha``
  should be scaled for weights far from the ``~1e-2`` magnitudes of trained layers.
  With ``group_size`` the regularizer is the paper's per-group variant, one
  l-infinity term per group of ``group_size`` consecutive inputs of a channel,
  :math:`\\alpha \\sum_g \\|w_g\\|_\\infty` (:func:`prox_group_linf`), to go with
  group grids; the paper uses ``alpha = 1e-4`` there.

  Args:
    w: ``(d_in, d_out)`` float weights (Flax layout).
    gram: ``(d_in, d_in)`` symmetric positive semi-definite ``X^T X``
      (:func:`quant_core.capture.accumulate_gram`), not all zero.
    alpha: regularization weight ``>= 0``; 0 returns ``w``.
    iters: number of proximal gradient steps, a Python int ``>= 1``.
    group_size: inputs per l-infinity term, a Python int ``>= 1``, or None (one
      term per channel).

  Returns:
    The preprocessed weights, shape and dtype of ``w`` (computed in at least
    float32). Quantize them in place of ``w``; measure the error against the
    original ``w``.

  Raises:
    ValueError: ``w`` not 2-D or empty, ``gram`` not ``(d_in, d_in)``, a
      non-floating dtype, ``alpha`` not a scalar ``>= 0``, ``iters`` or
      ``group_size`` not an int ``>= 1``; for concrete inputs also NaN/inf
      values or an all-zero ``gram``.
  """
  w = jnp.asarray(w)
  if gram is None:
    raise ValueError("magr needs the Gram matrix gram = X^T X of the layer inputs.")
  gram = objective.check_layer_inputs(w, None, gram)
  if 0 in w.shape:
    raise ValueError(f"w must have at least one input and one output, got shape {w.shape}.")
  check_alpha(alpha)
  check_int("iters", iters)
  if group_size is not None:
    check_int("group_size", group_size)
  if validation.is_concrete(gram) and not bool(jnp.any(gram != 0)):
    raise ValueError("gram is all zero: MagR needs inputs that are not all zero.")
  dtype = objective.compute_dtype(w.dtype)
  wt = solve_channel_major(w.T.astype(dtype), gram.astype(dtype), jnp.asarray(alpha, dtype),
                           iters=int(iters),
                           group_size=None if group_size is None else int(group_size))
  return wt.T.astype(w.dtype)


def check_int(name, value):
  """Raises ValueError unless ``value`` is an int ``>= 1`` (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}.")


def check_alpha(alpha):
  if not validation.is_concrete(alpha):
    return
  value = np.asarray(alpha)
  if (value.shape != () or not np.issubdtype(value.dtype, np.number)
      or np.iscomplexobj(value) or not np.isfinite(value) or value < 0):
    raise ValueError(f"alpha must be a finite real scalar >= 0, got {alpha!r}.")
