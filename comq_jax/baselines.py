"""Baselines on the same grids and statistics as COMQ: round-to-nearest.

Reference: A. Zhang et al., "COMQ: A Backpropagation-Free Algorithm for
Post-Training Quantization", arXiv 2403.07134 (2024), which compares against
round-to-nearest on the same grid.
"""

import functools

import jax
import jax.numpy as jnp

from comq_jax import grid as grid_lib
from comq_jax import objective


def round_to_nearest(w, x=None, *, bits: int, grid: str = "asymmetric",
                     granularity: str = "channel", scalar: float = 1.0,
                     gram=None) -> objective.LayerQuantization:
  """Round-to-nearest baseline on the same grid as :func:`comq_jax.quantize_layer`.

  .. math:: q_{ji} = \\Pi_{G_j}(w_{ji})

  Args:
    w: ``(d_in, d_out)`` weights (Flax layout).
    x: optional ``(N, d_in)`` inputs, to report the error.
    bits, grid, granularity, scalar: as in :func:`comq_jax.quantize_layer`.
    gram: optional ``X^T X`` instead of ``x``.

  Returns:
    A :class:`LayerQuantization`; ``error`` is None without ``x``/``gram``.
  """
  grid_lib.check_options(bits=bits, grid=grid, granularity=granularity,
                         scalar=scalar)
  w = jnp.asarray(w)
  gram = objective.check_layer_inputs(w, x, gram)
  wt = w.T.astype(objective.compute_dtype(w.dtype))
  qt, codes, g = rtn_solve(wt, bits=bits, grid=grid, granularity=granularity,
                           scalar=float(scalar))
  error = None if gram is None else objective.reconstruction_error(
      wt.T, qt.T, gram.astype(wt.dtype))
  return objective.layer_result(w, qt, codes, g, error,
                               jnp.zeros((0,), wt.dtype))


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
