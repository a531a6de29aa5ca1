"""The layer objective shared by COMQ and its baselines.

Every layer solver minimises ``||X W - X Q||_F^2`` over ``Q`` on a grid, using
only the Gram matrix ``H = X^T X`` of the layer inputs. This module holds the
streamed Gram, the error from the Gram, the input checks and the result type.

Reference: A. Zhang et al., "COMQ: A Backpropagation-Free Algorithm for
Post-Training Quantization", arXiv 2403.07134 (2024).
"""

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from inq_jax import validation


class GramAccumulator(NamedTuple):
  """Running Gram matrix ``sum_b X_b^T X_b`` and its row count."""
  gram: jax.Array
  count: jax.Array


def gram_matrix(x):
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
  g = gram_matrix(x_batch)
  n = jnp.asarray(x_batch.shape[0], jnp.int32)
  if acc is None:
    return GramAccumulator(gram=g, count=n)
  if acc.gram.shape != g.shape:
    raise ValueError(
        f"x_batch has d_in={x_batch.shape[1]} but the accumulator holds a "
        f"Gram of shape {acc.gram.shape}.")
  return GramAccumulator(gram=acc.gram + g, count=acc.count + n)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weights", "codes", "levels", "scale", "zero_point", "exponent",
                 "error", "history"],
    meta_fields=["group_size", "bits", "grid"])
@dataclasses.dataclass(frozen=True)
class LayerQuantization:
  """Result of :func:`comq_jax.quantize_layer` and the baselines.

  Layouts follow Flax: weight-shaped arrays are ``(d_in, d_out)`` and
  per-channel arrays have length ``d_out``. With group-wise grids
  (``group_size`` set) the per-channel arrays gain a group axis: ``(d_out,
  groups)``, and ``levels`` is ``(d_out, groups, L)``; input ``i`` belongs
  to group ``i // group_size`` (the last group may be shorter).

  A pytree: the arrays are its leaves, and the grid's layout (``group_size``,
  ``bits``, ``grid``) is static metadata, so a result can leave ``jax.jit``
  whole and packs without its settings repeated
  (:func:`inq_jax.deploy.pack_layer_quantization`).

  Attributes:
    weights: de-quantized weights, shape and dtype of ``w``;
      ``weights[i, j] == levels[j, codes[i, j]]`` (``levels[j, i //
      group_size, codes[i, j]]`` with groups).
    codes: int32 index of each weight into its grid's sorted ``levels``.
    levels: ``(d_out, L)`` grid values of each channel, in ``w``'s dtype.
    scale: ``(d_out,)`` value of one integer code step. Uniform grids decode
      as ``scale * (codes - zero_point)`` (to 1 ulp); for pow2 this is
      ``2^n1``.
    zero_point: ``(d_out,)`` int32 code of zero (``-z`` of the official grid).
    exponent: ``(d_out,)`` int32 INQ ``n1`` per channel for ``grid="pow2"``
      (pack with :func:`inq_jax.pow2.pow2_encode`), zeros otherwise.
    error: ``||X W - X weights||_F`` from the Gram, or None without data.
    history: errors after each sweep and, with ``scale_update``, after each
      scale update (``iters`` or ``2 * iters`` entries); empty for RTN.
    group_size: inputs per grid, or None for per-channel and per-layer grids.
    bits: the bit width the weights were quantized to.
    grid: the grid kind: ``"asymmetric"``, ``"symmetric"`` or ``"pow2"``.
  """
  weights: jax.Array
  codes: jax.Array
  levels: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  exponent: jax.Array
  error: Optional[jax.Array]
  history: jax.Array
  group_size: Optional[int]
  bits: int
  grid: str


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
    validation.check_floating(x, "x")
    validation.check_finite(x, "x")
    return gram_matrix(x)
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
  """A :class:`LayerQuantization` from channel-major solver outputs."""
  d_out = qt.shape[0]
  per_row = lambda a: a if group_size is None else a.reshape((d_out, -1) + a.shape[1:])
  return LayerQuantization(
      weights=qt.T.astype(w.dtype), codes=codes.T,
      levels=per_row(g.values().astype(w.dtype)),
      scale=per_row(g.step * g.unit_scale), zero_point=per_row(g.zero_point),
      exponent=per_row(g.exponent), error=error, history=history,
      group_size=group_size, bits=bits, grid=grid)


