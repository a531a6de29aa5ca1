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
from quant_core import validation

_HIGHEST = jax.lax.Precision.HIGHEST


def project_l1_ball(v, radius=1.0):
  """Euclidean projection of each row (last axis) of ``v`` onto an l1 ball.

  .. math:: P(v) = \\arg\\min_{\\|u\\|_1 \\le r} \\|u - v\\|_2
    = \\operatorname{sign}(v) \\max(|v| - \\theta, 0)

  with the threshold :math:`\\theta \\ge 0` found by sorting :math:`|v|`
  (Duchi, Shalev-Shwartz, Singer, Chandra, ICML 2008): with :math:`u` the sorted
  magnitudes in decreasing order and :math:`c_k = \\sum_{i \\le k} u_i`,
  :math:`\\rho = \\max\\{k : u_k > (c_k - r) / k\\}` and
  :math:`\\theta = \\max((c_\\rho - r) / \\rho, 0)`; a row already inside the ball
  gets :math:`\\theta = 0` and is returned unchanged.

  Args:
    v: ``(..., n)`` float array, ``n >= 1``.
    radius: ball radius ``r > 0``.

  Returns:
    The projection, shape and dtype of ``v``.
  """
  mag = jnp.abs(v)
  u = -jnp.sort(-mag, axis=-1)
  csum = jnp.cumsum(u, axis=-1)
  k = jnp.arange(1, v.shape[-1] + 1, dtype=v.dtype).reshape((1,) * (v.ndim - 1) + (-1,))
  # The condition holds on a prefix of k (always for k = 1): rho is its length.
  rho = jnp.max(jnp.where(u * k > csum - radius, k, 0), axis=-1, keepdims=True)
  index = rho.astype(jnp.int32) - 1
  theta = (jnp.take_along_axis(csum, index, axis=-1) - radius) / rho
  theta = jnp.maximum(theta, 0)
  return jnp.sign(v) * jnp.maximum(mag - theta, 0)


def prox_linf(v, t):
  """Proximal map of ``t * ||.||_inf`` on each row (last axis) of ``v``.

  By the Moreau decomposition (the dual norm of l-infinity is l1),

  .. math:: \\operatorname{prox}_{t\\|\\cdot\\|_\\infty}(v)
    = v - t\\, P_{\\{\\|u\\|_1 \\le 1\\}}(v / t);

  ``t = 0`` gives ``v``.
  """
  positive = t > 0
  safe = jnp.where(positive, t, 1)
  return jnp.where(positive, v - t * project_l1_ball(v / safe), v)


@functools.partial(jax.jit, static_argnames=("iters",))
def _solve(wt0, gram, alpha, *, iters):
  """Proximal gradient on channel-major ``(d_out, d_in)`` weights."""
  gram = 0.5 * (gram + gram.T)
  top = jnp.linalg.eigvalsh(gram)[-1]
  h = gram / jnp.where(top > 0, top, 1)

  def step(_, wt):
    grad = jnp.matmul(wt - wt0, h, precision=_HIGHEST)
    return prox_linf(wt - grad, alpha)

  return jax.lax.fori_loop(0, iters, step, wt0)


def magr(w, gram, *, alpha=1e-3, iters=200) -> jax.Array:
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
  The regularizer acts on whole channels, as fits per-channel grids; the paper's
  per-group variant (an l-infinity term per group, ``alpha = 1e-4``) is not
  implemented here.

  Args:
    w: ``(d_in, d_out)`` float weights (Flax layout).
    gram: ``(d_in, d_in)`` symmetric positive semi-definite ``X^T X``
      (:func:`quant_core.capture.accumulate_gram`), not all zero.
    alpha: regularization weight ``>= 0``; 0 returns ``w``.
    iters: number of proximal gradient steps, a Python int ``>= 1``.

  Returns:
    The preprocessed weights, shape and dtype of ``w`` (computed in at least
    float32). Quantize them in place of ``w``; measure the error against the
    original ``w``.

  Raises:
    ValueError: ``w`` not 2-D or empty, ``gram`` not ``(d_in, d_in)``, a
      non-floating dtype, ``alpha`` not a scalar ``>= 0`` or ``iters`` not an int
      ``>= 1``; for concrete inputs also NaN/inf values or an all-zero ``gram``.
  """
  w = jnp.asarray(w)
  if gram is None:
    raise ValueError("magr needs the Gram matrix gram = X^T X of the layer inputs.")
  gram = objective.check_layer_inputs(w, None, gram)
  if 0 in w.shape:
    raise ValueError(f"w must have at least one input and one output, got shape {w.shape}.")
  _check_alpha(alpha)
  if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
    raise ValueError(f"iters must be an int >= 1, got {iters!r}.")
  if validation.is_concrete(gram) and not bool(jnp.any(gram != 0)):
    raise ValueError("gram is all zero: MagR needs inputs that are not all zero.")
  dtype = objective.compute_dtype(w.dtype)
  wt = _solve(w.T.astype(dtype), gram.astype(dtype), jnp.asarray(alpha, dtype),
              iters=int(iters))
  return wt.T.astype(w.dtype)


def _check_alpha(alpha):
  if not validation.is_concrete(alpha):
    return
  value = np.asarray(alpha)
  if (value.shape != () or not np.issubdtype(value.dtype, np.number)
      or np.iscomplexobj(value) or not np.isfinite(value) or value < 0):
    raise ValueError(f"alpha must be a finite real scalar >= 0, got {alpha!r}.")
