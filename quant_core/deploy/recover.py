"""Codes recovered from de-quantized values, for weights that come from elsewhere.

A result of :mod:`comq_jax` or :mod:`inq_jax` keeps its codes and grid, and packs
by re-layout (:func:`quant_core.deploy.codes.pack_layer_quantization`). A float tree
whose values lie on a grid but whose codes are lost (a user's own power-of-two or
grid-valued weights, a checkpoint of such weights) packs here: per grid cell, a scale
and integer levels (or the exponent ``n1``) that reproduce every value bit for bit.
"""

from typing import Optional

import numpy as np

from quant_core import pow2
from quant_core.deploy import packed_layers
from quant_core.deploy.packed_layers import PackedLayer
from quant_core.deploy.codes import _QUOTED_INDICES
from quant_core.deploy.codes import _check_group_size
from quant_core.deploy.codes import LAYER_GRIDS
from quant_core.deploy.codes import pack
from quant_core.deploy.codes import pack_uniform_from_values


GRANULARITIES = ("channel", "group", "layer")


# Ulps around |top| / n_top tried as a cell's scale: |top| = fl(n_top · scale)
# carries one rounding and the quotient another.
_SCALE_ULPS = 3


def _cells(matrix: np.ndarray, granularity: str, group_size) -> np.ndarray:
  """The ``(K, N)`` values as grid cells ``(cells, values)``: one per output
  channel, per (group of input rows, channel) in ``(groups, N)`` order, or
  one for the whole matrix. A short last group is padded with copies of its
  last row, which adds no new value."""
  if granularity == "layer":
    return matrix.reshape(1, -1)
  if granularity == "channel":
    return matrix.T
  k, n = matrix.shape
  groups = -(-k // group_size)
  padded = np.pad(matrix, ((0, groups * group_size - k), (0, 0)), mode="edge")
  return padded.reshape(groups, group_size, n).transpose(0, 2, 1).reshape(
      groups * n, group_size)


def _decode(levels: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
  """``float32(level) · float32(scale)`` cast to ``dtype``: the arithmetic of
  :func:`unpack` for uniform grids."""
  return (levels.astype(np.float32) * scale[:, None]).astype(dtype)


def _uniform_cells(cells: np.ndarray, bits: int, symmetric: bool):
  """Per cell, a float32 scale and int levels ``l`` with ``decode(l, scale)``
  equal to the cell's values: ``(scale, levels, solved)``.

  Every value of a uniform grid is ``fl(l · scale)`` with integer ``l`` in a
  window of ``2^bits`` (asymmetric) or in ``±(2^(bits-1) - 1)`` (symmetric).
  The smallest gap between distinct values is ``k · scale`` for a small
  integer ``k``; each ``k`` gives an estimate, the value of largest magnitude
  its level, and the scales within a few ulps of ``|top| / level`` are
  checked against every value of the cell. Any scale that reproduces every
  value bit for bit is as good as the quantizer's.
  """
  values = cells.astype(np.float32)
  num, width = values.shape
  window = 2**bits - 1 if not symmetric else 2**(bits - 1) - 1
  top = np.abs(values[np.arange(num), np.argmax(np.abs(values), axis=1)])
  ordered = np.sort(values, axis=1)
  gaps = np.diff(ordered, axis=1)
  gap = np.min(np.where(gaps > 0, gaps, np.inf), axis=1, initial=np.inf)
  # A cell of zeros: any scale; one distinct value v != 0: scale |v|.
  scale = np.where(top == 0, np.float32(1), np.where(np.isinf(gap), top, np.nan)
                   ).astype(np.float32)
  levels = np.zeros(values.shape, np.int64)
  solved = np.zeros(num, bool)

  def accept(candidate, rows):
    found = np.round(values[rows] / candidate[:, None])
    decoded = _decode(found, candidate, cells.dtype)
    span = (np.max(np.abs(found), axis=1) if symmetric else
            np.max(found, axis=1) - np.min(found, axis=1))
    good = np.all(decoded == cells[rows], axis=1) & (span <= window)
    scale[rows[good]] = candidate[good]
    levels[rows[good]] = found[good].astype(np.int64)
    solved[rows[good]] = True

  accept(scale[~np.isnan(scale)], np.flatnonzero(~np.isnan(scale)))
  for k in range(1, window + 1):
    rows = np.flatnonzero(~solved & np.isfinite(gap))
    if not rows.size:
      break
    top_level = np.maximum(np.round(top[rows] / (gap[rows] / k)), 1)
    base = (top[rows] / top_level).astype(np.float32)
    candidates, up, down = [base], base, base
    for _ in range(_SCALE_ULPS):
      up = np.nextafter(up, np.float32(np.inf))
      down = np.nextafter(down, np.float32(0))
      candidates += [up, down]
    for candidate in candidates:
      pending = ~solved[rows]
      if not pending.any():
        break
      accept(candidate[pending], rows[pending])
  return scale, levels, solved


def _pow2_cells(cells: np.ndarray, bits: int):
  """Per cell, the ``n1`` of its values: the largest exponent present
  (:data:`quant_core.pow2.ZERO_LAYER_N1` for a cell of zeros). Whether every
  value is in the set of that ``n1`` is checked by :func:`pack`."""
  del bits
  mantissa, exponent = np.frexp(np.abs(cells.astype(np.float32)))
  exponent = np.where(mantissa > 0, exponent - 1, np.iinfo(np.int32).min)
  n1 = np.max(exponent, axis=1)
  return np.where(n1 == np.iinfo(np.int32).min, pow2.ZERO_LAYER_N1,
                  n1).astype(np.int32)


def _raise_unsolved(solved: np.ndarray, granularity: str, n: int,
                    description: str) -> None:
  """ValueError naming the cells whose values lie on no grid."""
  bad = np.flatnonzero(~solved)
  if not bad.size:
    return
  name = {"channel": lambda c: f"channel {c}",
          "group": lambda c: f"group {c // n} of channel {c % n}",
          "layer": lambda c: "the matrix"}[granularity]
  quoted = ", ".join(name(int(c)) for c in bad[:_QUOTED_INDICES])
  raise ValueError(
      f"{bad.size} of {solved.size} grid cells hold values on no {description} "
      f"(first: {quoted}); quantized with another grid, or with a shrink "
      f"factor scalar != 1 (whose levels are not on such a grid)?")


def pack_matrix_values(matrix, *, bits: int, grid: str, granularity: str,
                       group_size: Optional[int] = None,
                       k_tile: Optional[int] = None):
  """Packs a de-quantized ``(K, N)`` matrix, recovering its grid from its values.

  The grid parameters are not taken from the quantizer (COMQ's scale update
  moves them away from the min-max rule); they are recovered from the values,
  which lie on the grid: per cell (output channel, group of ``group_size``
  input rows of a channel, or the whole matrix), a float32 scale and integer
  levels with ``float32(level) · scale`` equal to every value bit for bit
  (uniform grids; the asymmetric zero point puts the smallest level at code
  0), or the largest exponent present as ``n1`` (power of two). A per-matrix
  (``"layer"``) uniform scale is stored per channel.

  Args:
    matrix: floating ``(K, N)`` values (numpy or jax, eager).
    bits: code width, 2..8.
    grid: one of :data:`LAYER_GRIDS`.
    granularity: one of :data:`GRANULARITIES`.
    group_size: input rows per cell with ``granularity="group"``, else None.
    k_tile: as :func:`pack_uniform`.

  Returns:
    A :class:`PackedUniform` or :class:`PackedPow2`; :func:`unpack` gives
    ``matrix`` back bit for bit.

  Raises:
    ValueError: on bad options, or values on no grid of the stated kind (the
      message counts the cells and names the first ones).
  """
  if grid not in LAYER_GRIDS:
    raise ValueError(f"grid must be one of {LAYER_GRIDS}, got {grid!r}.")
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got "
                     f"{granularity!r}.")
  if (granularity == "group") != (group_size is not None):
    raise ValueError("group_size must be given exactly with granularity="
                     f"'group', got granularity={granularity!r}, group_size="
                     f"{group_size!r}.")
  bits = pow2.check_bits(bits)
  matrix = np.asarray(matrix)
  if matrix.ndim != 2:
    raise ValueError(f"matrix must be (K, N), got shape {matrix.shape}.")
  k, n = matrix.shape
  group_size = _check_group_size(group_size)
  cells = _cells(matrix, granularity, group_size)
  by_cell = lambda p: p.reshape(-1, n) if granularity == "group" else p
  if grid == "pow2":
    n1 = _pow2_cells(cells, bits)
    n1 = n1.reshape(()) if granularity == "layer" else by_cell(n1)
    return pack(matrix, bits, n1, k_tile=k_tile, group_size=group_size)
  symmetric = grid == "symmetric"
  scale, levels, solved = _uniform_cells(cells, bits, symmetric)
  _raise_unsolved(solved, granularity, n, f"{bits}-bit {grid} grid "
                  "scale · (code - zero_point)")
  zero_point = None if symmetric else -np.min(levels, axis=1).astype(np.int32)
  if granularity == "layer":
    scale = np.broadcast_to(scale, (n,))
    zero_point = None if symmetric else np.broadcast_to(zero_point, (n,))
  return pack_uniform_from_values(
      matrix, by_cell(scale), None if symmetric else by_cell(zero_point),
      bits=bits, group_size=group_size, k_tile=k_tile)


def pack_layer_values(kernel, view, *, bits: int, grid: str, granularity: str,
                      group_size: Optional[int] = None,
                      k_tile: Optional[int] = None) -> PackedLayer:
  """Packs a layer's de-quantized kernel over its view, each matrix with
  :func:`pack_matrix_values` (the grid recovered from the values).

  Args:
    kernel: the float kernel, on a grid of the stated kind.
    view: its layer's 2-D view (:mod:`quant_core.layers`).
    bits: as :func:`pack_matrix_values`.
    grid: as :func:`pack_matrix_values`.
    granularity: as :func:`pack_matrix_values` (``"layer"``: one grid per
      feature group, as ``comq_jax.quantize_model``).
    group_size: as :func:`pack_matrix_values`.
    k_tile: as :func:`quant_core.deploy.codes.pack_uniform`; default from ``d_in``.

  Returns:
    A :class:`~quant_core.deploy.packed_layers.PackedLayer`.
  """
  kernel = np.asarray(kernel)
  matrices = view.matrices(kernel)
  packed = packed_layers.pack_groups(view.groups, lambda g: pack_matrix_values(
      matrices[g], bits=bits, grid=grid, granularity=granularity, group_size=group_size,
      k_tile=k_tile))
  return packed_layers.stack_groups(packed, view, kernel.shape, kernel.dtype)
