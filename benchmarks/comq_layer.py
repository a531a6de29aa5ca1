"""Times the Gram-based COMQ layer solver against an X-based implementation.

The X-based baseline follows the official code's data flow: it keeps the
``N x d_out`` output residual ``U = X (W - Q)^T`` and, per coordinate, gathers
each channel's input column ``x_i`` and computes ``<x_i, U_j>``. It is a
jitted ``lax.scan`` over coordinates with ``X`` stored transposed so the
per-step gather reads contiguous rows. Both solve the same problem (4-bit,
greedy order, one sweep) on the same grid; the script checks they give the
same ``Q`` and prints medians over repeats, after compilation.

Run: ``python benchmarks/comq_layer.py [--d_in 1536 --d_out 384 --n 2048]``.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from comq_jax import grid as grid_lib
from comq_jax import layer


@jax.jit
def x_based_comq(wt, x):
  """One greedy COMQ sweep (4-bit asymmetric grid) working from ``X``."""
  rows = jnp.arange(wt.shape[0])
  g = grid_lib.make_grid(wt, bits=4)
  values = g.values()
  xt = x.T
  sq_norms = jnp.sum(x * x, axis=0)
  perm = jnp.argsort(-(jnp.sqrt(sq_norms)[None, :] * jnp.abs(wt)), axis=1,
                     stable=True).astype(jnp.int32)
  u = jnp.zeros((wt.shape[0], x.shape[0]), wt.dtype)

  def step(carry, i):
    qt, u = carry
    xi = xt[i]
    w = wt[rows, i]
    q_old = qt[rows, i]
    h = sq_norms[i]
    target = w + (jnp.sum(xi * u, axis=1) - h * (w - q_old)) / h
    _, q_new = grid_lib.nearest(values, target)
    u = u + (w - q_new - (w - q_old))[:, None] * xi
    return (qt.at[rows, i].set(q_new), u), None

  (qt, _), _ = jax.lax.scan(step, (wt, u), perm.T)
  return qt


def gram_based_comq(wt, x):
  gram = layer._gram(x)
  qt, *_ = layer.solve(wt, gram, bits=4, iters=1, order="greedy",
                       scale_update=False, scalar=1.0, grid="asymmetric",
                       granularity="channel")
  return qt


def median_time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--d_in", type=int, default=1536)
  parser.add_argument("--d_out", type=int, default=384)
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((args.n, args.d_in))
                  * rng.uniform(0.2, 3.0, args.d_in), jnp.float32)
  wt = jnp.asarray(rng.normal(0, 0.05, (args.d_out, args.d_in)), jnp.float32)

  q_gram = np.asarray(gram_based_comq(wt, x))
  q_x = np.asarray(x_based_comq(wt, x))
  mismatch = float(np.mean(~np.isclose(q_gram, q_x, rtol=1e-5, atol=0)))
  t_gram = median_time(gram_based_comq, wt, x, repeats=args.repeats)
  t_x = median_time(x_based_comq, wt, x, repeats=args.repeats)
  print(f"layer {args.d_in}->{args.d_out}, N={args.n}, 4-bit greedy K=1, "
        f"{jax.devices()[0].platform}, median of {args.repeats}")
  print(f"Q mismatch fraction (Gram vs X-based): {mismatch:.2e}")
  print(f"Gram solver (incl. X^T X): {t_gram * 1e3:9.1f} ms")
  print(f"X-based solver:            {t_x * 1e3:9.1f} ms")
  print(f"speed-up: {t_x / t_gram:.1f}x")


if __name__ == "__main__":
  main()
