"""Baselines on the same grids and Gram statistics as COMQ: round-to-nearest and GPTQ.

References:
  A. Zhang et al., "COMQ: A Backpropagation-Free Algorithm for Post-Training
  Quantization", arXiv 2403.07134 (2024), which compares against both.
  E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate
  Post-Training Quantization for Generative Pre-trained Transformers",
  ICLR 2023 (arXiv 2210.17323), Algorithm 1.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import grids as grid_lib
from comq_jax import objective


@functools.partial(jax.jit, static_argnames=("bits", "grid", "granularity",
                                             "scalar", "group_size"))
def rtn_solve(wt, *, bits, grid, granularity, scalar, group_size=None):
  """Jitted round-to-nearest core in channel-major layout.

  Returns:
    ``(qt, codes_t, grid)``, see :func:`comq_jax.rtn`.
  """
  g = grid_lib.make_grid(wt, bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar, group_size=group_size)
  codes, qt = grid_lib.round_to_grid(g.values(), wt, group_size)
  return qt, codes, g


# comq_jax.gptq's defaults: the paper code's block of 128 and 1% dampening.
GPTQ_DEFAULTS = dict(block_size=128, damp=0.01, act_order=False)


def check_gptq_options(*, granularity, block_size, damp, act_order,
                       static_groups) -> None:
  """Raises ValueError on GPTQ options outside their ranges."""
  if (isinstance(block_size, (bool, np.bool_))
      or not isinstance(block_size, (int, np.integer)) or block_size < 1):
    raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}.")
  if not isinstance(damp, (int, float)) or not 0.0 < damp < 1.0:
    raise ValueError(f"damp must be a number in (0, 1), got {damp!r}.")
  if act_order and granularity == "group" and not static_groups:
    raise ValueError(
        "act_order with granularity='group' needs static_groups=True: groups are "
        "consecutive inputs, so their grids must be fixed before the permutation.")


def _inverse_cholesky(gram, damp, d_in):
  """Upper ``U`` with ``U^T U = (H + λ I)^{-1}``, and whether it is finite.

  ``λ = damp · mean(diag H)`` over the first ``d_in`` (real) inputs, after
  dead inputs get ``H_ii = 1`` as in the paper's code.
  """
  d = gram.shape[0]
  dead = jnp.diagonal(gram) == 0
  gram = jnp.where(jnp.diag(dead), jnp.ones_like(gram), gram)
  mean_diagonal = jnp.mean(jnp.diagonal(gram)[:d_in])
  gram = gram + damp * mean_diagonal * jnp.eye(d, dtype=gram.dtype)
  lower = jnp.linalg.cholesky(gram)
  inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(d, dtype=gram.dtype))
  upper = jnp.linalg.cholesky(inverse).T
  return upper, jnp.all(jnp.isfinite(upper))


@functools.partial(jax.jit, static_argnames=(
    "bits", "grid", "granularity", "group_size", "scalar", "block_size", "damp",
    "act_order", "static_groups"))
def gptq_solve(wt, gram, *, bits, grid, granularity, group_size, scalar, block_size,
               damp, act_order, static_groups):
  """Jitted GPTQ core in channel-major layout; see :func:`comq_jax.gptq`.

  Returns:
    ``(qt, codes_t, grid, error, positive_definite)``.
  """
  gram = gram.astype(wt.dtype)
  d_out, d_in = wt.shape
  options = dict(bits=bits, grid=grid, scalar=scalar)
  grouped = granularity == "group"
  dynamic_groups = grouped and not static_groups
  # Grids fixed before the sweep; dynamic groups replace theirs on the way.
  g = grid_lib.make_grid(wt, granularity=granularity, group_size=group_size, **options)
  if act_order:
    perm = jnp.argsort(-jnp.diagonal(gram), stable=True)
  else:
    perm = jnp.arange(d_in)
  block = group_size * max(1, block_size // group_size) if grouped else block_size
  n = -(-d_in // block) * block
  pad = n - d_in
  # Padded inputs come last with an identity Gram: they take no error from the
  # real ones and give none back.
  w_perm = jnp.pad(wt[:, perm], ((0, 0), (0, pad)))
  gram_perm = jnp.pad(gram[perm][:, perm], ((0, pad), (0, pad)))
  gram_perm = gram_perm + jnp.diag((jnp.arange(n) >= d_in).astype(gram.dtype))
  upper, positive_definite = _inverse_cholesky(gram_perm, damp, d_in)
  groups = grid_lib.num_groups(d_in, group_size)
  values = g.values().reshape(d_out, groups, -1)
  group_of = (jnp.minimum(jnp.pad(perm, (0, pad)) // (group_size or d_in), groups - 1)
              if grouped else jnp.zeros((n,), jnp.int32))

  def block_step(w_all, start):
    w_block = jax.lax.dynamic_slice_in_dim(w_all, start, block, axis=1)
    u_block = jax.lax.dynamic_slice_in_dim(upper, start, block, axis=0)
    u_diag = jax.lax.dynamic_slice_in_dim(u_block, start, block, axis=1)

    def group_grid(w_block, i):
      """The grid of the group starting at input i, from the weights as updated."""
      span = jax.lax.dynamic_slice_in_dim(w_block, i, group_size, axis=1)
      # A ragged last group: stand-ins equal to its first input keep min and max.
      valid = (start + i + jnp.arange(group_size)) < d_in
      span = jnp.where(valid[None, :], span, span[:, :1])
      return grid_lib.make_grid(span, granularity="channel", **options)

    def column(i, carry):
      w_block, quantized, errors, codes, current, used = carry
      if dynamic_groups:
        current = jax.lax.cond(i % group_size == 0, group_grid, lambda *_: current,
                               w_block, i)
        used = jax.tree.map(
            lambda table, field: jax.lax.dynamic_update_index_in_dim(
                table, field, i // group_size, axis=0), used, current)
        row_values = current.values()
      else:
        row_values = values[:, group_of[start + i]]
      w_i = jax.lax.dynamic_index_in_dim(w_block, i, axis=1, keepdims=False)
      code, q_i = grid_lib.nearest(row_values, w_i)
      error = (w_i - q_i) / u_diag[i, i]
      # U is upper triangular: only inputs from i on move.
      w_block = w_block - error[:, None] * u_diag[i][None, :]
      put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, axis=1)
      return (w_block, put(quantized, q_i), put(errors, error), put(codes, code),
              current, used)

    # Per-channel stand-ins (unused without dynamic groups) fix the carry's shapes.
    current = jax.tree.map(lambda a: a[:d_out], g)
    used = jax.tree.map(lambda a: jnp.stack([a] * (block // (group_size or block))),
                        current)
    _, quantized, errors, codes, _, used = jax.lax.fori_loop(
        0, block, column,
        (w_block, jnp.zeros_like(w_block), jnp.zeros_like(w_block),
         jnp.zeros(w_block.shape, jnp.int32), current, used))
    later = (jnp.arange(n) >= start + block)[None, :]
    w_all = w_all - jnp.where(later, jnp.matmul(
        errors, u_block, precision=jax.lax.Precision.HIGHEST), 0.0)
    return w_all, (quantized, codes, used)

  starts = jnp.arange(0, n, block)
  _, (q_blocks, code_blocks, used) = jax.lax.scan(block_step, w_perm, starts)
  unblock = lambda a: jnp.swapaxes(a, 0, 1).reshape(d_out, n)[:, :d_in]
  inverse = jnp.argsort(perm)
  qt = unblock(q_blocks)[:, inverse]
  codes = unblock(code_blocks)[:, inverse]
  if dynamic_groups:
    # (blocks, groups per block, d_out, ...) -> rows (channel, group), as make_grid.
    g = jax.tree.map(
        lambda a: jnp.swapaxes(a.reshape((-1,) + a.shape[2:])[:groups], 0, 1).reshape(
            (d_out * groups,) + a.shape[3:]), used)
  error = objective.reconstruction_error(wt.T, qt.T, gram)
  return qt, codes, g, error, positive_definite
