"""COMQ layer solver: coordinate descent over bit-codes (and scales).

Reference: A. Zhang, Z. Yang, N. Wang, Y. Qin, J. Xin, X. Li, P. Yin,
"COMQ: A Backpropagation-Free Algorithm for Post-Training Quantization",
arXiv 2403.07134 (2024); official code AozhongZhang/COMQ (``quant.py``).

The solver minimises ``||X W - X Q||_F^2`` (:mod:`comq_jax.objective`) over
``Q`` on a per-channel grid using only the Gram matrix ``H = X^T X`` (memory
``O(d_in^2)``, no ``N``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from comq_jax import baselines
from quant_core import grids as grid_lib

ORDERS = ("greedy", "cyclic", "diag")


def greedy_order(wt, gram_diag):
  """The official COMQ greedy visiting order of each output channel.

  Channel ``j`` visits its inputs by descending score (ties by index)

  .. math:: s_{ji} = \\sqrt{H_{ii}}\\, |w_{ji}|

  (``--greedy`` of the official code for Zhang et al., arXiv 2403.07134):
  ``argsort(-s, stable=True)``. A stable argsort compiles in a fraction of
  the time of a rank-based sort, and whole models compile one solve per
  layer signature.

  Args:
    wt: ``(d_out, d_in)`` weights, channel-major.
    gram_diag: ``(d_in,)`` diagonal of the Gram matrix, ``||x_i||^2``.

  Returns:
    ``(d_out, d_in)`` int32; row ``j`` is channel ``j``'s order.
  """
  score = jnp.sqrt(jnp.maximum(gram_diag, 0.0))[None, :] * jnp.abs(wt)
  return jnp.argsort(-score, axis=1, stable=True).astype(jnp.int32)


# Coordinates per block of a sweep (multiple of nothing in particular: tuned
# on CPU with benchmarks/comq_layer.py; the pairwise gathers grow with it).
_BLOCK = 16

# Channels per solver step. XLA:CPU may round a channel's results differently
# when the number of channels in an operation changes (a matmul's blocking, a
# reduction's vectorisation follow the shapes), so the solver runs on chunks of
# this many channels, one after another: a solve sharded over devices then
# runs the same programs on the same shapes as one on a single device.
_CHANNEL_CHUNK = 64


def _matmul(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _sweep(wt, qt, values, gram, perm, *, first, group_size=None):
  """One coordinate-descent pass; every channel visits its own order.

  Step ``t`` sets ``q_ji``, ``i = perm[j, t]``, to the grid point nearest to
  the exact 1-D minimiser ``w_ji + (E_ji - H_ii (w_ji - q_ji)) / H_ii`` with
  ``E = (W - Q) H``. A dead input (``H_ii = 0``) does not affect the
  objective; it keeps the nearest grid point to ``w_ji``.

  The steps run in blocks of ``_BLOCK``. A block reads its ``E`` entries
  once, follows its own updates through the pairwise Gram entries
  ``H[i_s, i_r]`` (``s < r``) of its coordinates, and then adds all of them
  to ``E`` in one pass: the same floating-point operations as updating
  ``E`` after every step, with far less memory traffic. With one shared
  order (``perm`` of shape ``(1, d_in)``, cyclic) that pass is a dense
  matmul.

  Args:
    wt, qt: ``(d_out, d_in)`` weights and current quantized weights.
    values: ``(d_out * groups, L)`` grid values, one row per channel or per
      ``(channel, group)`` (:func:`quant_core.grids.make_grid`).
    gram: ``(d_in, d_in)`` Gram matrix.
    perm: ``(d_out, d_in)`` or ``(1, d_in)`` int32 visiting orders.
    first: ``qt`` is ``wt`` (so ``E = 0`` needs no matmul).
    group_size: inputs per group of the grid rows, or None (one per channel).

  Returns:
    ``(qt, codes)``, both ``(d_out, d_in)``.
  """
  d_out, d_in = wt.shape
  shared = perm.shape[0] == 1
  groups = grid_lib.num_groups(d_in, group_size)
  per_group = values.reshape(d_out, groups, -1)

  def row_values(coords):
    """``(d_out, L)`` grid of each channel at input ``coords`` (its group)."""
    if group_size is None:
      return values
    group = jnp.minimum(coords // group_size, groups - 1)  # padded inputs: any
    group = jnp.broadcast_to(group, (d_out,))
    return jnp.take_along_axis(per_group, group[:, None, None], axis=1)[:, 0]

  pad = -d_in % _BLOCK
  if pad:
    # Padded inputs have zero Gram rows and come last: they change nothing.
    wt = jnp.pad(wt, ((0, 0), (0, pad)))
    qt = jnp.pad(qt, ((0, 0), (0, pad)))
    gram = jnp.pad(gram, ((0, pad), (0, pad)))
    tail = jnp.arange(d_in, d_in + pad, dtype=jnp.int32)
    perm = jnp.concatenate(
        [perm, jnp.broadcast_to(tail[None, :], (perm.shape[0], pad))], axis=1)
  n = d_in + pad
  if first:
    e = jnp.zeros_like(wt)
  else:
    e = _matmul(wt - qt, gram)
  diag = jnp.diagonal(gram)
  flat_gram = gram.reshape(-1)
  pair_s, pair_r = np.triu_indices(_BLOCK, 1)

  def by_block(a):
    """``(rows, n)`` in visiting order to ``(n / _BLOCK, rows, _BLOCK)``."""
    return jnp.swapaxes(a.reshape(a.shape[0], n // _BLOCK, _BLOCK), 0, 1)

  def block(e, xs):
    idx, w, q_old = xs
    eb = jnp.take_along_axis(e, jnp.broadcast_to(idx, w.shape), axis=1)
    # Strictly upper triangle of the block's Gram, gathered pair by pair.
    pairs = jnp.zeros(idx.shape + (_BLOCK,), gram.dtype).at[
        :, pair_s, pair_r].set(flat_gram[idx[:, pair_s] * n + idx[:, pair_r]])
    h = diag[idx]
    live = h > 0
    safe_h = jnp.where(live, h, jnp.ones_like(h))

    def step(s, carry):
      eb, q_new, codes = carry
      col = lambda a: jax.lax.dynamic_index_in_dim(a, s, axis=1,
                                                   keepdims=False)
      w_s, q_s, h_s = col(w), col(q_old), col(h)
      target = jnp.where(col(live),
                         w_s + (col(eb) - h_s * (w_s - q_s)) / col(safe_h),
                         w_s)
      c, q = grid_lib.nearest(row_values(col(idx)), target)
      row = jax.lax.dynamic_index_in_dim(pairs, s, axis=1, keepdims=False)
      eb = eb + (q_s - q)[:, None] * row
      put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, s, axis=1)
      return eb, put(q_new, q), put(codes, c)

    _, q_new, codes = jax.lax.fori_loop(
        0, _BLOCK, step, (eb, jnp.zeros_like(w), jnp.zeros(w.shape, jnp.int32)))
    delta = q_old - q_new
    if shared:
      e = e + _matmul(delta, gram[idx[0]])
    else:
      for s in range(_BLOCK):
        e = e + delta[:, s, None] * gram[idx[:, s]]
    return e, (q_new, codes)

  wp = jnp.take_along_axis(wt, jnp.broadcast_to(perm, wt.shape), axis=1)
  qp = jnp.take_along_axis(qt, jnp.broadcast_to(perm, qt.shape), axis=1)
  # Results leave the scan as outputs, not as a carry updated in place.
  _, (qb, cb) = jax.lax.scan(block, e, (by_block(perm), by_block(wp),
                                        by_block(qp)))
  rows = jnp.arange(d_out)[:, None]
  unblock = lambda a: jnp.swapaxes(a, 0, 1).reshape(d_out, n)
  qt = jnp.zeros((d_out, n), wt.dtype).at[rows, perm].set(unblock(qb))
  codes = jnp.zeros((d_out, n), jnp.int32).at[rows, perm].set(unblock(cb))
  return qt[:, :d_in], codes[:, :d_in]


def _best_step(num, den, old_step, old_exponent, is_pow2, scale_dtype=None):
  """Minimiser of ``s^2 den - 2 s num`` over positive steps (powers of two for pow2,
  values of ``scale_dtype`` when set).

  The objective is a convex quadratic in ``s``, so the best power of two is one
  of the two around the unconstrained optimum, and the best float16 value the
  nearest to it. A non-positive or undefined optimum keeps the old step.
  """
  ok = (den > 0) & (num > 0)
  best = jnp.where(ok, num / jnp.where(ok, den, jnp.ones_like(den)), old_step)
  best = grid_lib.representable_step(best, scale_dtype, round_up=False)
  exponent = old_exponent
  if is_pow2:
    lo_exp = jnp.floor(jnp.log2(best)).astype(jnp.int32)
    lo = jnp.ldexp(jnp.ones_like(best), lo_exp)
    hi = 2.0 * lo
    cost = lambda s: s * s * den - 2.0 * s * num
    pick_hi = cost(hi) < cost(lo)
    best = jnp.where(ok, jnp.where(pick_hi, hi, lo), old_step)
    exponent = jnp.where(ok, lo_exp + pick_hi.astype(jnp.int32), exponent)
  return best, exponent


def _scale_statistics(wt, codes, g, gram):
  """Per channel ``(u_j^T H (w_j - m_j), u_j^T H u_j)``, ``u_j`` the level units of
  the codes and ``m_j`` the grid's offset (0 but for ``grid="offset"``, whose min
  stays fixed): the numerator and denominator of the paper's least-squares
  scale."""
  u = jnp.take_along_axis(g.units, codes, axis=1)
  uh = _matmul(u, gram)
  if g.offset is not None:
    wt = wt - g.offset[:, None]
  return jnp.sum(uh * wt, axis=1), jnp.sum(uh * u, axis=1)


def _update_group_scales(wt, codes, g, gram, size, is_pow2, scale_dtype=None):
  """The scale step with one scale per ``(channel, group)``, group after group.

  For group ``k`` with the other groups' scales fixed, the objective is a
  quadratic in ``δ_jk`` with optimum ``u_jk^T H (w_j - q_j^{(-k)}) /
  (u_jk^T H u_jk)``, ``u_jk`` the units of group ``k`` (zero elsewhere), and
  ``q_j^{(-k)}`` the quantized weights without ``δ_jk u_jk`` (offsets, fixed,
  included). One pass of these exact block steps (block coordinate descent)
  never raises the objective; the residual ``H (w - q)`` follows each step.
  """
  d_out, d_in = wt.shape
  groups = grid_lib.num_groups(d_in, size)
  pad = groups * size - d_in
  u = jnp.pad(grid_lib.lookup(g.units, codes, size), ((0, 0), (0, pad)))
  gram = jnp.pad(gram, ((0, pad), (0, pad)))
  steps = g.step.reshape(d_out, groups)
  exponents = g.exponent.reshape(d_out, groups)
  q = u * jnp.repeat(steps, size, axis=1)
  if g.offset is not None:
    q = q + jnp.repeat(g.offset.reshape(d_out, groups), size, axis=1)
  residual = _matmul(jnp.pad(wt, ((0, 0), (0, pad))) - q, gram)

  def group_step(k, carry):
    steps, exponents, residual = carry
    u_k = jax.lax.dynamic_slice_in_dim(u, k * size, size, axis=1)
    uh = _matmul(u_k, jax.lax.dynamic_slice_in_dim(gram, k * size, size, axis=0))
    den = jnp.sum(jax.lax.dynamic_slice_in_dim(uh, k * size, size, axis=1) * u_k, axis=1)
    old = steps[:, k]
    num = jnp.sum(jax.lax.dynamic_slice_in_dim(residual, k * size, size, axis=1) * u_k,
                  axis=1) + old * den
    new, exponent = _best_step(num, den, old, exponents[:, k], is_pow2, scale_dtype)
    residual = residual - (new - old)[:, None] * uh
    return steps.at[:, k].set(new), exponents.at[:, k].set(exponent), residual

  steps, exponents, _ = jax.lax.fori_loop(0, groups, group_step,
                                          (steps, exponents, residual))
  return g._replace(step=steps.reshape(-1), exponent=exponents.reshape(-1))


def _solve_channels(wt, gram, g, start, *, iters, order, scale_update, grid,
                    granularity, group_size, first, chunk, channel_total,
                    scale_dtype=None):
  """The sweeps and scale steps of :func:`solve` on a block of channels.

  Every step runs on one chunk of ``chunk`` channels after another (the same
  programs on the same shapes whatever the block), and a channel's results
  depend only on its own row, except for the per-layer scale step and the
  errors: they add per-channel sums over the layer with ``channel_total``.
  So a block of channels on one device computes what the whole layer
  computes for them.

  The paper's scale step (``scale_update``): per channel ``δ_j = (u_j^T H
  w_j) / (u_j^T H u_j)`` with ``u_j`` the level units of the codes (per
  layer: both sums over channels); pow2 steps stay powers of two
  (:func:`_best_step`); with groups, :func:`_update_group_scales`.

  Args:
    wt, start: ``(rows, d_in)`` weights and the first sweep's start; ``rows``
      a multiple of ``chunk``.
    gram: ``(d_in, d_in)`` Gram matrix, in ``wt``'s dtype.
    g: the channels' :class:`quant_core.grids.Grid`, fields ``(rows, groups, ...)``.
    first: ``start`` is ``wt`` (the first sweep needs no residual product).
    channel_total: maps a ``(rows,)`` per-channel vector to its sum over the
      layer's channels.
    iters, order, scale_update, grid, granularity, group_size, scale_dtype: as
      in :func:`solve`.

  Returns:
    ``(qt, codes_t, grid, error, history)`` of the block (grid fields
    ``(rows, groups, ...)``); the error and history are the layer's.
  """
  rows = wt.shape[0]
  is_pow2 = grid == "pow2"

  def by_chunk(fn, *arrays):
    """``fn`` on each chunk of channels of ``arrays`` (pytrees of row-major
    arrays), results joined back into rows."""
    parts = jax.tree.map(lambda a: a.reshape((rows // chunk, chunk) + a.shape[1:]),
                         arrays)
    out = jax.lax.map(lambda part: fn(*part), parts)
    return jax.tree.map(lambda a: a.reshape((rows,) + a.shape[2:]), out)

  flat = lambda g: jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), g)
  per_channel = lambda g: jax.tree.map(lambda a: a.reshape((chunk, -1) + a.shape[1:]), g)

  def error(qt):
    def squared(w, q):
      d = w - q
      return jnp.sum(d * _matmul(d, gram), axis=1)
    return jnp.sqrt(jnp.maximum(channel_total(by_chunk(squared, wt, qt)), 0.0))

  if order == "greedy":
    perm = by_chunk(lambda w: greedy_order(w, jnp.diagonal(gram)), wt)
  elif order == "diag":
    # One order for every channel, by descending H_ii (ties by index), as GPTQ's act-order.
    perm = jnp.argsort(-jnp.diagonal(gram), stable=True).astype(jnp.int32)[None, :]
  else:
    perm = jnp.arange(wt.shape[1], dtype=jnp.int32)[None, :]

  def sweep(qt, g, first):
    def chunk_sweep(w, q, g, *chunk_perm):
      return _sweep(w, q, flat(g).values(), gram, chunk_perm[0] if chunk_perm else perm,
                    first=first, group_size=group_size)
    return by_chunk(chunk_sweep, wt, qt, g, *([perm] if order == "greedy" else []))

  def update_scale(codes, g):
    if granularity == "group":
      return by_chunk(lambda w, c, g: per_channel(_update_group_scales(
          w, c, flat(g), gram, group_size, is_pow2, scale_dtype)), wt, codes, g)
    num, den = by_chunk(lambda w, c, g: _scale_statistics(w, c, flat(g), gram),
                        wt, codes, g)
    if granularity == "layer":
      # Behind a barrier XLA cannot see the divisor is one broadcast value and
      # turn the division into a product by its reciprocal (in one program and
      # not in another).
      num, den = jax.lax.optimization_barrier(
          (jnp.broadcast_to(channel_total(num), num.shape),
           jnp.broadcast_to(channel_total(den), den.shape)))

    def chunk_step(num, den, g):
      step, exponent = _best_step(num, den, g.step[:, 0], g.exponent[:, 0], is_pow2,
                                  scale_dtype)
      return g._replace(step=step[:, None], exponent=exponent[:, None])
    return by_chunk(chunk_step, num, den, g)

  def one_round(qt, g, first):
    """A sweep, then the optional scale step; returns their errors too."""
    qt, codes = sweep(qt, g, first)
    errors = [error(qt)]
    if scale_update:
      g = update_scale(codes, g)
      qt = by_chunk(lambda g, c: grid_lib.lookup(flat(g).values(), c, group_size),
                    g, codes)
      errors.append(error(qt))
    return qt, codes, g, jnp.stack(errors)

  qt, codes, g, errors = one_round(start, g, first)
  history = jnp.zeros((iters,) + errors.shape, errors.dtype).at[0].set(errors)

  def later_round(k, carry):
    # One loop body for sweeps 2..K: compiled once, whatever K is.
    qt, _, g, history = carry
    qt, codes, g, errors = one_round(qt, g, False)
    return qt, codes, g, history.at[k].set(errors)

  if iters > 1:  # Tracing an empty loop would cost a second sweep's tracing.
    qt, codes, g, history = jax.lax.fori_loop(1, iters, later_round,
                                              (qt, codes, g, history))
  history = history.reshape(-1)
  return qt, codes, g, history[-1], history


def solve_on_devices(wt, gram, *, bits, iters, order, scale_update, scalar, grid,
                     granularity, group_size=None, init="float", axes=None, devices=1,
                     scale_dtype=None):
  """The COMQ solve on this device's share of the channels.

  Without ``axes`` it solves the whole layer. With ``axes`` it must run inside
  ``jax.shard_map`` over those mesh axes (``devices`` devices), every device
  with the whole replicated ``wt`` and ``gram``: each solves its share of the
  channels and gathers the others', so every device returns the whole
  result. The grid (with its per-layer reduction, a max and a min, exact in
  any order) and the GPTQ start come from the whole layer on every device.
  Inside the split, every step runs over the same chunks of channels either
  way, and sums over channels add a gathered ``(d_out,)`` vector: the
  result is bitwise the same for any ``devices``.

  Args:
    wt, gram: as in :func:`solve`.
    bits, iters, order, scale_update, scalar, grid, granularity, group_size,
      init, scale_dtype: as in :func:`comq_jax.comq`.
    axes: mesh axis names the channels are split over, or None.
    devices: number of devices over ``axes``.

  Returns:
    As :func:`solve`.
  """
  gram = gram.astype(wt.dtype)
  d_out = wt.shape[0]
  g = grid_lib.make_grid(wt, bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar, group_size=group_size, scale_dtype=scale_dtype)
  start = wt
  if init != "float":
    gptq, _, _, _, positive_definite = baselines.gptq_solve(
        wt, gram, bits=bits, grid=grid, granularity=granularity,
        group_size=group_size, scalar=scalar, static_groups=True,
        scale_dtype=scale_dtype,
        **dict(baselines.GPTQ_DEFAULTS, act_order=init == "gptq-act-order"))
    # Without a usable Cholesky factor GPTQ has no solution: start from W.
    start = jnp.where(positive_definite, gptq, wt)
  chunk = min(_CHANNEL_CHUNK, d_out)
  rows = -(-d_out // (chunk * devices)) * chunk  # per device
  # Padding channels copy the last one: a real problem, solved and dropped.
  pad = lambda a, size: jnp.pad(a, ((0, size - d_out),) + ((0, 0),) * (a.ndim - 1),
                                mode="edge")
  own = lambda a: pad(a, rows)
  gather = lambda a: a
  if axes is not None:
    own = lambda a: jax.lax.dynamic_slice_in_dim(
        pad(a, rows * devices), jax.lax.axis_index(axes) * rows, rows)
    gather = lambda a: jax.lax.all_gather(a, axes, tiled=True)

  def channel_total(values):
    # A materialised (d_out,) vector: one reduction program for any split.
    return jnp.sum(jax.lax.optimization_barrier(gather(values)[:d_out]))

  per_channel = jax.tree.map(lambda a: own(a.reshape((d_out, -1) + a.shape[1:])), g)
  qt, codes, per_channel, error, history = _solve_channels(
      own(wt), gram, per_channel, own(start), iters=iters, order=order,
      scale_update=scale_update, grid=grid, granularity=granularity,
      group_size=group_size, first=init == "float", chunk=chunk,
      channel_total=channel_total, scale_dtype=scale_dtype)
  qt, codes, per_channel = jax.tree.map(lambda a: gather(a)[:d_out],
                                        (qt, codes, per_channel))
  g = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), per_channel)
  return qt, codes, g, error, history


@functools.partial(jax.jit, static_argnames=(
    "bits", "iters", "order", "scale_update", "scalar", "grid", "granularity",
    "group_size", "init", "mesh", "scale_dtype"))
def solve(wt, gram, *, bits, iters, order, scale_update, scalar, grid,
          granularity, group_size=None, init="float", mesh=None, scale_dtype=None):
  """Jitted COMQ core in channel-major layout; see :func:`comq_jax.comq`.

  With a ``mesh`` the channels are split over all its devices
  (:func:`solve_on_devices`); the results, replicated, are bitwise those
  without a mesh.

  Args:
    wt: ``(d_out, d_in)`` float weights.
    gram: ``(d_in, d_in)`` Gram matrix of the layer inputs.
    bits, iters, order, scale_update, scalar, grid, granularity, group_size,
      init, mesh, scale_dtype: as in :func:`comq_jax.comq` (static).

  Returns:
    ``(qt, codes_t, grid, error, history)`` with ``qt``/``codes_t`` of shape
    ``(d_out, d_in)`` and ``grid`` a :class:`quant_core.grids.Grid`.
  """
  options = dict(bits=bits, iters=iters, order=order, scale_update=scale_update,
                 scalar=scalar, grid=grid, granularity=granularity,
                 group_size=group_size, init=init, scale_dtype=scale_dtype)
  if mesh is None:
    return solve_on_devices(wt, gram, **options)
  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(
      functools.partial(solve_on_devices, axes=mesh.axis_names,
                        devices=mesh.devices.size, **options),
      mesh=mesh, in_specs=replicated, out_specs=replicated,
      # Every device gathers the whole result.
      check_vma=False)(wt, gram)


INITS = ("float", "gptq", "gptq-act-order")


def check_options(*, iters, order, init) -> None:
  """Raises ValueError on COMQ solver options outside their ranges."""
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"iters must be an integer >= 1, got {iters!r}.")
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}.")


