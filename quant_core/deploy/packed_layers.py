"""The one packed representation of a layer: the packed matrices of its 2-D view.

Every method packs to it: a PTQ result re-lays its solver's codes
(:func:`pack_quantized_layer`), an INQ kernel encodes its powers of two under its
known ``n1`` (:func:`pack_pow2_layer`), and float weights of unknown grid
recover theirs (:func:`quant_core.deploy.recover.pack_layer_values`).
:func:`quant_core.deploy.packed_apply` runs it for every layer kind (grouped and
depthwise convs included), and :func:`unpack` turns a packed tree
back into the exact float tree.
"""

from typing import Any, Optional, Tuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from quant_core import grids
from quant_core import im2col
from quant_core import layers
from quant_core import paths
from quant_core.deploy import codes

PyTree = Any


@struct.dataclass
class PackedLayer:
  """A layer's kernel as the packed matrices of its 2-D view (a pytree).

  The view is that of :mod:`quant_core.layers`: ``groups`` matrices ``(d_in,
  d_out)`` (one per conv feature group), rows in the order of the layer's input
  rows (for a conv, its im2col patch features), so a packed apply multiplies
  ``view.rows(x)`` by them with no reordering.

  Attributes:
    matrices: a :class:`~quant_core.deploy.codes.PackedUniform` or
      :class:`~quant_core.deploy.codes.PackedPow2` of logical shape ``(d_in,
      d_out)`` whose arrays carry a leading ``groups`` axis (``jax.vmap`` over it
      gives each group's packed matrix).
    kernel_shape: static, the shape of the float kernel it replaces.
    kernel_perm: static, for a contraction (Dense, DenseGeneral, Einsum) the
      kernel axes in view order (contracted, then features); None for a
      convolution (im2col order).
    dtype: static, the float kernel's dtype name, which :func:`unpack_layer`
      gives back.
  """
  matrices: Any
  kernel_shape: Tuple[int, ...] = struct.field(pytree_node=False)
  kernel_perm: Optional[Tuple[int, ...]] = struct.field(pytree_node=False, default=None)
  dtype: str = struct.field(pytree_node=False, default="float32")

  @property
  def shape(self) -> Tuple[int, ...]:
    """The float kernel's shape (what Flax and :mod:`quant_core.layers` read)."""
    return self.kernel_shape

  @property
  def groups(self) -> int:
    return self.matrices.data.shape[0]

  def group(self, index: int):
    """The packed matrix of feature group ``index``."""
    return jax.tree.map(lambda array: array[index], self.matrices)


def is_packed_kernel(leaf) -> bool:
  """True for a packed kernel: :class:`PackedLayer`, or a bare packed weight."""
  return isinstance(leaf, PackedLayer) or codes.is_packed(leaf)


def logical_shapes(tree) -> dict:
  """``{"/"-joined leaf path: shape}`` of variables, packed or float; a packed
  kernel counts as the float kernel it stands for. An ``nnx.Module`` counts as
  ``{"params": its nnx.Param state}``, the tree its packed variables have."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(tree, nnx.Module):
    tree = {"params": nnx.to_pure_dict(nnx.state(tree, nnx.Param))}
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_packed_kernel)
  return {paths.path_name(path): tuple(np.shape(leaf) if not hasattr(leaf, "shape")
                                       else leaf.shape) for path, leaf in flat}


def kernel_perm_of(view) -> Optional[tuple]:
  """The :attr:`PackedLayer.kernel_perm` of a 2-D view."""
  return None if isinstance(view, layers.Convolution) else tuple(view.kernel_perm)


def kernel_from_matrices(matrices, kernel_shape, kernel_perm):
  """A layer's kernel from its ``(groups, d_in, d_out)`` view matrices (numpy
  stays numpy): the inverse of ``view.matrices``."""
  if kernel_perm is None:
    return im2col.kernel_from_matrix(matrices, kernel_shape)
  permuted = matrices.reshape(tuple(kernel_shape[a] for a in kernel_perm))
  inverse = tuple(kernel_perm.index(a) for a in range(len(kernel_perm)))
  return permuted.transpose(inverse)


def stack_groups(packed: list, view, kernel_shape, dtype) -> PackedLayer:
  stacked = jax.tree.map(lambda *arrays: jnp.stack(arrays), *packed)
  return PackedLayer(matrices=stacked, kernel_shape=tuple(kernel_shape),
                     kernel_perm=kernel_perm_of(view), dtype=jnp.dtype(dtype).name)


def pack_groups(groups: int, pack_group):
  """``[pack_group(g) for g in range(groups)]``, naming the group in errors."""
  packed = []
  for index in range(groups):
    try:
      packed.append(pack_group(index))
    except ValueError as error:
      where = f"feature group {index}: " if groups > 1 else ""
      raise ValueError(f"{where}{error}") from error
  return packed


def pack_quantized_layer(quantization: grids.LayerQuantization, view, *,
                         dtype=None, k_tile: Optional[int] = None) -> PackedLayer:
  """Packs a layer from its solver's codes: a re-layout, nothing recovered.

  Args:
    quantization: the layer's :class:`quant_core.grids.LayerQuantization` with a
      leading ``groups`` axis on every array (``comq_jax.LayerReport.quantization``).
    view: the layer's 2-D view (:mod:`quant_core.layers`).
    dtype: the float kernel's dtype (default: that of ``quantization.weights``).
    k_tile: as :func:`quant_core.deploy.codes.pack_uniform`.

  Returns:
    A :class:`PackedLayer` whose codes are the solver's own (uniform grids) or the
    power-of-two codes of its values under the solver's exponents.

  Raises:
    ValueError: for codes whose layout does not match the view, or the errors of
      :func:`quant_core.deploy.codes.pack_layer_quantization`.
  """
  codes_shape = tuple(np.shape(quantization.codes))
  expected = (view.groups, view.d_in, view.d_out)
  if codes_shape != expected:
    raise ValueError(f"the codes have shape {codes_shape}, the layer's view has "
                     f"matrices {expected}.")
  group = lambda g: jax.tree.map(lambda a: a[g], quantization)
  packed = pack_groups(view.groups, lambda g: codes.pack_layer_quantization(
      group(g), k_tile=k_tile))
  dtype = np.asarray(quantization.weights).dtype if dtype is None else dtype
  return stack_groups(packed, view, view.kernel_shape, dtype)


def pack_pow2_layer(kernel, view, *, bits: int, n1, k_tile: Optional[int] = None
                    ) -> PackedLayer:
  """Packs a kernel of powers of two under a known per-layer exponent ``n1`` (INQ).

  Args:
    kernel: the float kernel, every value in the ``bits``-bit set of ``n1``.
    view: its layer's 2-D view.
    bits: code width, 2..8.
    n1: the layer's largest exponent (``INQState.n1``).
    k_tile: as :func:`quant_core.deploy.codes.pack`.

  Returns:
    A :class:`PackedLayer`.

  Raises:
    ValueError: for a value outside the set (counted, first indices quoted).
  """
  kernel = np.asarray(kernel)
  matrices = view.matrices(kernel)
  packed = pack_groups(view.groups, lambda g: codes.pack(matrices[g], bits, n1,
                                                        k_tile=k_tile))
  return stack_groups(packed, view, kernel.shape, kernel.dtype)


def unpack_layer(packed: PackedLayer, dtype=None) -> jax.Array:
  """The float kernel of a :class:`PackedLayer` (its own dtype by default)."""
  dtype = packed.dtype if dtype is None else dtype
  matrices = jnp.stack([codes.unpack_matrix(packed.group(g), dtype)
                        for g in range(packed.groups)])
  return kernel_from_matrices(matrices, packed.kernel_shape, packed.kernel_perm)


def unpack(packed_variables: PyTree, dtype=None) -> PyTree:
  """Every packed kernel of a tree back to its float kernel: the inverse of the
  packing functions, exact for a tree packed from a quantized model.

  Args:
    packed_variables: a tree whose packed leaves are :class:`PackedLayer` (from
      :func:`quant_core.deploy.pack_quantization`, ``inq_jax.pack_model``,
      :func:`quant_core.deploy.pack_layers` or
      :func:`quant_core.deploy.load_packed`) or bare packed weights.
    dtype: optional dtype of the kernels; default each kernel's own (a bare packed
      weight: float32).

  Returns:
    The tree with float kernels; other leaves unchanged.
  """
  def unpack_leaf(leaf):
    if isinstance(leaf, PackedLayer):
      return unpack_layer(leaf, dtype)
    if codes.is_packed(leaf):
      return codes.unpack_matrix(leaf, jnp.float32 if dtype is None else dtype)
    return leaf

  return jax.tree.map(unpack_leaf, packed_variables, is_leaf=is_packed_kernel)
