"""One size accounting: bytes of quantized weights against FP32.

Every size figure of the project comes from here: the packed tree's real bytes
(:func:`size_report`), and the size a quantization result will take once packed
(:func:`layer_bytes`, summed by ``comq_jax.ModelQuantization.size_report``).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import grids
from quant_core import paths
from quant_core.deploy.codes import PackedPow2
from quant_core.deploy.codes import unpack_codes
from quant_core.deploy.packed_layers import PackedLayer
from quant_core.deploy.packed_layers import is_packed_kernel

PyTree = Any


class SizeReport(NamedTuple):
  """Storage of a packed params pytree, in bytes.

  Attributes:
    fp32_bytes: every parameter stored as float32.
    packed_bytes: what the packed pytree really holds: the code arrays
      (padding included), the grid parameters as stored (``n1``: int32;
      ``scale``: float32; ``zero_point``: int32), and the other leaves in
      their own dtype.
    codebook_bytes: the information-theoretic size of the codes under a
      uniform code, ``sum_l size_l · log2(levels_l) / 8`` (``levels`` is
      ``2^bits`` for asymmetric grids, so this is ``bits`` bits a weight;
      ``2^bits - 1`` symmetric; ``2^(bits-1) + 1`` power-of-two), plus the
      grid parameters and the other leaves as in ``packed_bytes``.
    entropy_bytes: the same with the empirical entropy of each layer's codes,
      ``sum_l size_l · H(codes_l) / 8`` (a lower bound for an entropy coder).
    quantized_fraction: share of parameters that are packed.
  """
  fp32_bytes: int
  packed_bytes: int
  codebook_bytes: float
  entropy_bytes: float
  quantized_fraction: float


def grid_parameters(packed) -> list:
  """The arrays stored beside the codes: ``[n1]`` or ``[scale(, zero_point)]``."""
  if isinstance(packed, PackedPow2):
    return [packed.n1]
  return [packed.scale] + ([] if packed.symmetric else [packed.zero_point])


def _code_entropy_bits(packed) -> float:
  """Empirical entropy in bits per weight of the codes (padding excluded)."""
  codes = np.asarray(unpack_codes(packed)[:packed.k])
  counts = np.bincount(codes.reshape(-1), minlength=2**packed.bits)
  probs = counts[counts > 0] / codes.size
  return float(-(probs * np.log2(probs)).sum())


def size_report(packed_params: PyTree) -> SizeReport:
  """Bytes of packed weights against FP32 and information-theoretic sizes.

  Args:
    packed_params: a pytree whose packed leaves are :class:`PackedPow2`,
      :class:`PackedUniform` or :class:`PackedLayer` (a single packed weight
      is a pytree too).

  Returns:
    A :class:`SizeReport`.
  """
  fp32 = packed = 0
  codebook = entropy = 0.0
  quantized = total = 0
  for leaf in jax.tree.leaves(packed_params, is_leaf=is_packed_kernel):
    if is_packed_kernel(leaf):
      size = math.prod(leaf.shape)
      quantized += size
      for matrix in (leaf.group(g) for g in range(leaf.groups)) if isinstance(
          leaf, PackedLayer) else [leaf]:
        matrix_size = math.prod(matrix.shape)
        parameter_bytes = sum(p.nbytes for p in grid_parameters(matrix))
        packed += matrix.data.nbytes + parameter_bytes
        codebook += (matrix_size * math.log2(matrix.num_levels) / 8
                     + parameter_bytes)
        entropy += matrix_size * _code_entropy_bits(matrix) / 8 + parameter_bytes
    else:
      size = int(np.size(leaf))
      own = size * jnp.asarray(leaf).dtype.itemsize
      packed += own
      codebook += own
      entropy += own
    total += size
    fp32 += 4 * size
  return SizeReport(fp32_bytes=fp32, packed_bytes=packed,
                    codebook_bytes=codebook, entropy_bytes=entropy,
                    quantized_fraction=quantized / total if total else 0.0)


def quantized_kernel_bytes(matrices, *, bits: int, grid: str, granularity: str,
                           group_size=None):
  """``(packed, codebook)`` bytes of one kernel stored as codes, before packing.

  ``ceil(bits * size / 8)`` bytes of codes (no padding) plus the grid parameters
  (:func:`quant_core.grids.parameter_bytes`) of one grid per matrix
  (``"layer"``), per output channel (``"channel"``), or per output channel and
  group of ``group_size`` of its ``d_in`` inputs (``"group"``);
  ``codebook`` counts ``log2(levels)`` bits per weight instead of ``bits``.

  Args:
    matrices: ``(groups, d_in, d_out)`` of the layer's 2-D view.
    bits, grid, granularity, group_size: the grid it is quantized onto.
  """
  groups, d_in, d_out = matrices
  size = groups * d_in * d_out
  num_grids = {"layer": groups, "channel": groups * d_out,
               "group": groups * d_out * grids.num_groups(d_in, group_size)}[granularity]
  grid_bytes = grids.parameter_bytes(grid, num_grids)
  return (math.ceil(bits * size / 8) + grid_bytes,
          size * math.log2(grids.num_levels(bits, grid)) / 8 + grid_bytes)


def variables_size_report(variables: PyTree, kernel_bytes: dict) -> SizeReport:
  """A :class:`SizeReport` of float variables some of whose kernels will be codes.

  Args:
    variables: the variables (``{"params": ...}``, other collections too).
    kernel_bytes: ``{module path: (packed, codebook)}`` of the quantized kernels
      (:func:`quantized_kernel_bytes`), paths ``/``-joined under ``params``.

  Returns:
    The report; every other leaf counts in its own dtype, and ``entropy_bytes``
    is None (the codes are not read).
  """
  fp32 = packed = codebook = 0
  quantized = total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = paths.keys_of(path)
    size = int(np.size(leaf))
    fp32 += 4 * size
    total += size
    entry = (kernel_bytes.get(paths.path_name(keys[1:-1]))
             if keys[0] == "params" and keys[-1] == "kernel" else None)
    if entry is None:
      own = size * jnp.asarray(leaf).dtype.itemsize
      packed += own
      codebook += own
      continue
    quantized += size
    packed += entry[0]
    codebook += entry[1]
  return SizeReport(fp32_bytes=fp32, packed_bytes=packed, codebook_bytes=codebook,
                    entropy_bytes=None, quantized_fraction=quantized / total if total else 0.0)
