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


@functools.partial(jax.jit, static_argnames=("bits", "grid", "granularity",
                                             "scalar", "group_size", "scale_dtype"))
def rtn_solve(wt, *, bits, grid, granularity, scalar, group_size=None, scale_dtype=None):
  """Jitted round-to-nearest core in channel-major layout.

  Returns:
    ``(qt, codes_t, grid)``, see :func:`comq_jax.rtn`.
  """
  g = grid_lib.make_grid(wt, bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar, group_size=group_size, scale_dtype=scale_dtype)
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


# Diagonal blocks at most this wide are factored directly (LAPACK); larger ones
# are split in two, so that most of the work runs as matrix products.
_CHOLESKY_BASE = 512
# Inputs per inner window of a GPTQ block: each column updates only its window;
# the window's error then reaches the rest of the block in one product.
_WINDOW = 32
# At most this many chunks of blocks: each is compiled on its own, and a block's
# error reaches the rest of its own chunk through a masked (chunk-wide) product.
_CHUNKS = 8


def _upper_inverse_cholesky(h):
  """Upper triangular ``U`` with ``U^T U = h^{-1}``, for a symmetric positive
  definite ``h``, without forming ``h^{-1}``.

  With ``V = U^{-1}`` (upper), ``h = V V^T``. Splitting ``h = [[A, B], [B^T, C]]``:

  .. math::

    V_{22} V_{22}^\\top = C, \\quad V_{12} = B U_{22}^\\top, \\quad
    V_{11} V_{11}^\\top = A - V_{12} V_{12}^\\top, \\quad
    U_{12} = -U_{11} V_{12} U_{22},

  recursively on ``C`` and on the Schur complement; blocks of at most
  ``_CHOLESKY_BASE`` inputs use the Cholesky factor of the reversed block
  (``J C J = L L^T`` gives ``U = J L^{-1} J``). About ``4/3 n^3`` flops, all but
  the small blocks in matrix products, against ``8/3 n^3`` for a Cholesky
  factor, an explicit inverse and a second factor. A matrix that is not
  positive definite gives NaN entries.

  Args:
    h: ``(n, n)`` symmetric positive definite matrix.

  Returns:
    ``(n, n)`` upper triangular ``U``.
  """
  n = h.shape[0]
  if n <= _CHOLESKY_BASE:
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    inverse = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=h.dtype),
                                                lower=True)
    return jnp.triu(inverse[::-1, ::-1])
  k = max(128, n // 2 // 128 * 128) if n >= 256 else n // 2
  mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  u22 = _upper_inverse_cholesky(h[k:, k:])
  v12 = mm(h[:k, k:], u22.T)
  u11 = _upper_inverse_cholesky(h[:k, :k] - mm(v12, v12.T))
  u12 = -mm(mm(u11, v12), u22)
  return jnp.block([[u11, u12], [jnp.zeros((n - k, k), h.dtype), u22]])


def _damped(gram, damp, d_in):
  """GPTQ's ``H' = H + D + λ I``: ``D`` sets a dead input's ``H_ii`` to 1 and
  ``λ = damp · mean(diag(H + D))`` over the first ``d_in`` (real) inputs.

  Returns:
    ``(H', weight)``: ``weight[i]`` is ``λ`` plus 1 on dead inputs, the
    diagonal of ``H' - H``.
  """
  d = gram.shape[0]
  diagonal = jnp.diagonal(gram)
  dead = diagonal == 0
  fixed = jnp.where(dead, jnp.ones_like(diagonal), diagonal)
  damping = damp * jnp.mean(fixed[:d_in])
  weight = damping + dead.astype(gram.dtype)
  index = jnp.arange(d)
  return gram.at[index, index].add(weight), weight


def _nearest_uniform(lowest, inverse_step, pick, target, levels):
  """:func:`quant_core.grids.nearest` on evenly spaced levels, from two of them.

  The estimate ``c = clip(floor((w - v_0) / Δ), 0, L - 2)`` is within one level
  of ``w`` even where float rounding moves it off by one near a level, so the
  nearer of levels ``c`` and ``c + 1`` (the lower one on a tie, as ``nearest``'s
  first minimum) is the nearest of all ``L`` levels: the distances computed in
  float rise monotonically away from ``w``. (Only a weight ``2^23`` steps outside
  its grid could see two levels at one float distance.)

  Args:
    lowest: ``(d_out,)`` the smallest level ``v_0`` of each row.
    inverse_step: ``(d_out,)`` ``1 / (v_1 - v_0)``.
    pick: maps ``(d_out,)`` level indices to their values.
    target: ``(d_out,)`` weights.
    levels: ``L``, the number of levels.

  Returns:
    ``(index, value)``, each ``(d_out,)``.
  """
  estimate = jnp.floor((target - lowest) * inverse_step)
  low = jnp.clip(estimate, 0, levels - 2).astype(jnp.int32)
  below, above = pick(low), pick(low + 1)
  up = jnp.abs(above - target) < jnp.abs(below - target)
  return low + up.astype(jnp.int32), jnp.where(up, above, below)


def _rounder(grid, values):
  """``(index, value)`` of the level nearest to a ``(d_out,)`` target on rows
  ``values`` ``(d_out, L)``: two levels for the uniform grids, all for pow2."""
  if grid == "pow2":
    return lambda target: grid_lib.nearest(values, target)
  levels = values.shape[1]
  lowest = values[:, 0]
  inverse_step = 1.0 / (values[:, 1] - values[:, 0])
  pick = lambda index: jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]
  return lambda target: _nearest_uniform(lowest, inverse_step, pick, target, levels)


@functools.partial(jax.jit, static_argnames=(
    "bits", "grid", "granularity", "group_size", "scalar", "block_size", "damp",
    "act_order", "static_groups", "scale_dtype"))
def gptq_solve(wt, gram, *, bits, grid, granularity, group_size, scalar, block_size,
               damp, act_order, static_groups, scale_dtype=None):
  """Jitted GPTQ core in channel-major layout; see :func:`comq_jax.gptq`.

  Work as in the paper's Algorithm 1 with lazy batches: ``U`` from
  :func:`_upper_inverse_cholesky`; a Python loop over the blocks, so that each
  block's error reaches only the later inputs (one product of ``d_out x B`` by
  ``B x (n - i_2)``); inside a block a loop over windows of ``_WINDOW`` inputs and
  inside a window a loop over its columns (a column updates its window only).
  Uniform grids round from two levels (:func:`_nearest_uniform`).

  The error comes from GPTQ's own errors ``e_i = (w_i - q_i) / U_ii``: with
  ``E = W_0 - Q`` on the permuted, padded inputs, ``e = E U^{-1}`` and so

  .. math::

    \\sum e^2 = \\operatorname{tr}(E H' E^\\top), \\qquad
    \\|X W - X Q\\|_F^2 = \\sum e^2 - \\sum_i \\operatorname{diag}(H' - H)_i
      \\|E_{:,i}\\|^2,

  with ``H' - H`` diagonal: ``λ``, plus 1 on dead and padded inputs.

  Returns:
    ``(qt, codes_t, grid, error, positive_definite)``.
  """
  gram = gram.astype(wt.dtype)
  d_out, d_in = wt.shape
  options = dict(bits=bits, grid=grid, scalar=scalar, scale_dtype=scale_dtype)
  grouped = granularity == "group"
  dynamic_groups = grouped and not static_groups
  # Grids fixed before the sweep; dynamic groups replace theirs on the way.
  g = grid_lib.make_grid(wt, granularity=granularity, group_size=group_size, **options)
  if act_order:
    perm = jnp.argsort(-jnp.diagonal(gram), stable=True)
    wt_perm, gram_perm = wt[:, perm], gram[perm][:, perm]
  else:
    perm = None
    wt_perm, gram_perm = wt, gram
  block = group_size * max(1, block_size // group_size) if grouped else block_size
  n = -(-d_in // block) * block
  pad = n - d_in
  # Padded inputs come last with a zero Gram, so that _damped makes them dead
  # inputs (H'_ii = 1 + λ): they take no error from the real ones and give none back.
  if pad:
    wt_perm = jnp.pad(wt_perm, ((0, 0), (0, pad)))
    gram_perm = jnp.pad(gram_perm, ((0, pad), (0, pad)))
  damped, weight = _damped(gram_perm, damp, d_in)
  upper = _upper_inverse_cholesky(damped)
  positive_definite = jnp.all(jnp.isfinite(upper))
  groups = grid_lib.num_groups(d_in, group_size)
  # (groups, d_out, L): the rows of one group are contiguous.
  tables = jnp.swapaxes(g.values().reshape(d_out, groups, -1), 0, 1)
  if grouped and not dynamic_groups:
    source = jnp.arange(n) if perm is None else jnp.pad(perm, (0, pad))
    group_of = jnp.minimum(source // group_size, groups - 1)
  window = next(s for s in range(min(_WINDOW, block), 0, -1)
                if block % s == 0 and (not dynamic_groups or group_size % s == 0))

  def group_grid(w_block, i, start):
    """The grid of the group starting at row i of w_block, from its weights as
    updated; w_block is (block, d_out)."""
    span = jax.lax.dynamic_slice_in_dim(w_block, i, group_size, axis=0).T
    # A ragged last group: stand-ins equal to its first input keep min and max.
    valid = (start + i + jnp.arange(group_size)) < d_in
    span = jnp.where(valid[None, :], span, span[:, :1])
    return grid_lib.make_grid(span, granularity="channel", **options)

  def solve_block(w_block, u_block, start):
    """Columns start.. of one block, rows of w_block (block, d_out); returns the
    quantized rows, their codes, GPTQ's errors e and the dynamic grids used."""

    def window_step(j, carry):
      w_block, quantized, errors, codes, current, used = carry
      first = j * window
      if dynamic_groups:
        current = jax.lax.cond(first % group_size == 0,
                               lambda: group_grid(w_block, first, start), lambda: current)
        used = jax.tree.map(
            lambda table, field: jax.lax.dynamic_update_index_in_dim(
                table, field, first // group_size, axis=0), used, current)
      w_win = jax.lax.dynamic_slice_in_dim(w_block, first, window, axis=0)
      u_win = jax.lax.dynamic_slice(u_block, (first, first), (window, window))

      def column(i, carry):
        w_win, q_win, e_win, c_win = carry
        if dynamic_groups:
          round_ = _rounder(grid, current.values())
        elif grouped:
          round_ = _rounder(grid, jax.lax.dynamic_index_in_dim(
              tables, group_of[start + first + i], axis=0, keepdims=False))
        else:
          round_ = _rounder(grid, tables[0])
        w_i = w_win[i]
        code, q_i = round_(w_i)
        error = (w_i - q_i) / u_win[i, i]
        # U is upper triangular: only inputs from i on move.
        w_win = w_win - u_win[i][:, None] * error[None, :]
        put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, axis=0)
        return w_win, put(q_win, q_i), put(e_win, error), put(c_win, code)

      zeros = jnp.zeros_like(w_win)
      _, q_win, e_win, c_win = jax.lax.fori_loop(
          0, window, column, (w_win, zeros, zeros, jnp.zeros(w_win.shape, jnp.int32)))
      if window < block:
        # The window's error reaches the block's later inputs.
        rows = jax.lax.dynamic_slice_in_dim(u_block, first, window, axis=0)
        rows = jnp.where(jnp.arange(block)[None, :] >= first + window, rows, 0.0)
        w_block = w_block - jnp.matmul(rows.T, e_win,
                                       precision=jax.lax.Precision.HIGHEST)
      put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, first, axis=0)
      return (w_block, put(quantized, q_win), put(errors, e_win), put(codes, c_win),
              current, used)

    # Per-channel stand-ins (unused without dynamic groups) fix the carry's shapes.
    current = jax.tree.map(lambda a: a[:d_out], g)
    used = jax.tree.map(lambda a: jnp.stack([a] * (block // (group_size or block))),
                        current)
    zeros = jnp.zeros_like(w_block)
    _, quantized, errors, codes, _, used = jax.lax.fori_loop(
        0, block // window, window_step,
        (w_block, zeros, zeros, jnp.zeros(w_block.shape, jnp.int32), current, used))
    return quantized, codes, errors, used

  # Inputs as rows: (n, d_out). `rest` holds the inputs not yet quantized.
  rest = wt_perm.T
  q_blocks, code_blocks, used_blocks = [], [], []
  squared = jnp.zeros((), wt.dtype)
  blocks = n // block
  chunks = min(blocks, _CHUNKS)
  bounds = [blocks * k // chunks * block for k in range(chunks + 1)]
  for start, end in zip(bounds[:-1], bounds[1:], strict=True):
    width = end - start
    u_chunk = upper[start:end, start:end]

    def block_step(w_chunk, first, start=start, width=width, u_chunk=u_chunk):
      w_block = jax.lax.dynamic_slice_in_dim(w_chunk, first, block, axis=0)
      u_block = jax.lax.dynamic_slice(u_chunk, (first, first), (block, block))
      quantized, codes, errors, used = solve_block(w_block, u_block, start + first)
      if width > block:
        # The block's error reaches the chunk's later inputs.
        rows = jax.lax.dynamic_slice_in_dim(u_chunk, first, block, axis=0)
        rows = jnp.where(jnp.arange(width)[None, :] >= first + block, rows, 0.0)
        w_chunk = w_chunk - jax.lax.dot_general(
            rows, errors, (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
      return w_chunk, (quantized, codes, errors, used)

    _, (quantized, codes, errors, used) = jax.lax.scan(
        block_step, rest[:width], jnp.arange(0, width, block))
    errors = errors.reshape(width, d_out)
    if end < n:
      # The chunk's error reaches the later inputs only.
      rest = rest[width:] - jax.lax.dot_general(
          upper[start:end, end:], errors, (((0,), (0,)), ((), ())),
          precision=jax.lax.Precision.HIGHEST)
    squared = squared + jnp.sum(errors * errors)
    q_blocks.append(quantized.reshape(width, d_out))
    code_blocks.append(codes.reshape(width, d_out))
    used_blocks.append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), used))
  q_perm = jnp.concatenate(q_blocks).T
  code_perm = jnp.concatenate(code_blocks).T
  difference = wt_perm - q_perm
  squared = squared - jnp.sum(difference * difference * weight[None, :])
  error = jnp.sqrt(jnp.maximum(squared, 0.0))
  qt, codes = q_perm[:, :d_in], code_perm[:, :d_in]
  if perm is not None:
    inverse = jnp.argsort(perm)
    qt, codes = qt[:, inverse], codes[:, inverse]
  if dynamic_groups:
    # (blocks, groups per block, d_out, ...) -> rows (channel, group), as make_grid.
    used = jax.tree.map(lambda *a: jnp.concatenate(a), *used_blocks)
    g = jax.tree.map(
        lambda a: jnp.swapaxes(a[:groups], 0, 1).reshape((d_out * groups,) + a.shape[2:]),
        used)
  return qt, codes, g, error, positive_definite
