"""The layer objective shared by COMQ and its baselines.

Every layer solver minimises ``||X W - X Q||_F^2`` over ``Q`` on a grid, using
only the Gram matrix ``H = X^T X`` of the layer inputs
(:mod:`quant_core.capture`). This module holds the error from the Gram, the input
checks and the construction of the result (:class:`quant_core.grids.LayerQuantization`).

Reference: A. Zhang et al., "COMQ: A Backpropagation-Free Algorithm for
Post-Training Quantization", arXiv 2403.07134 (2024).
"""

import jax
import jax.numpy as jnp

from quant_core import capture
from quant_core import grids
from quant_core import validation


def reconstruction_error(w, q, gram):
  """Layer reconstruction error from the Gram matrix.

  .. math:: \\|X W - X Q\\|_F = \\sqrt{\\operatorname{tr}((W - Q)^\\top H (W - Q))},
    \\qquad H = X^\\top X

  (the COMQ objective, Zhang et al., arXiv 2403.07134).

  Args:
    w: ``(d_in, d_out)`` float weights (Flax layout).
    q: quantized weights, shape of ``w``.
    gram: ``(d_in, d_in)`` Gram matrix ``X^T X``.

  Returns:
    A scalar, ``||X W - X Q||_F``.
  """
  d = w - q
  sq = jnp.sum(d * jnp.matmul(gram, d, precision=jax.lax.Precision.HIGHEST))
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def check_layer_inputs(w, x, gram):
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
    if x.shape[0] == 0:
      raise ValueError("x has no rows: the layer objective needs calibration inputs.")
    validation.check_floating(x, "x")
    validation.check_finite(x, "x")
    return capture.gram_matrix(x)
  if gram is not None:
    gram = jnp.asarray(gram)
    if gram.shape != (d_in, d_in):
      raise ValueError(
          f"gram must have shape ({d_in}, {d_in}), got {gram.shape}.")
    validation.check_floating(gram, "gram")
    validation.check_finite(gram, "gram")
    return gram
  return None


def compute_dtype(dtype):
  """Solver dtype for weights of ``dtype``: at least float32.

  Spelled out rather than ``jnp.promote_types`` so that it also holds under
  strict dtype promotion, where bfloat16 and float32 do not promote.
  """
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def layer_result(w, qt, codes, g, error, history, *, group_size, bits, grid):
  """A :class:`quant_core.grids.LayerQuantization` from channel-major solver outputs."""
  d_out = qt.shape[0]
  per_row = lambda a: a if group_size is None else a.reshape((d_out, -1) + a.shape[1:])
  return grids.LayerQuantization(
      weights=qt.T.astype(w.dtype), codes=codes.T,
      levels=per_row(g.values().astype(w.dtype)),
      scale=per_row(g.step * g.unit_scale), zero_point=per_row(g.zero_point),
      exponent=per_row(g.exponent), error=error, history=history,
      group_size=group_size, bits=bits, grid=grid)


