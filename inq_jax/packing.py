"""Packing an INQ-quantized model into the one packed representation.

Each quantized kernel becomes a :class:`quant_core.deploy.PackedLayer` over its
layer's 2-D view: its powers of two encoded under the layer's ``n1`` from the
:class:`inq_jax.INQState` (no exponent is recovered from the values), so
:func:`quant_core.deploy.packed_apply` runs every layer kind, grouped and
depthwise convs included, and :func:`quant_core.deploy.unpack` gives
the float tree back exactly.
"""

import logging
from typing import Any, Optional

import jax

from inq_jax.incremental import INQState
from quant_core import layers
from quant_core import paths
from quant_core import progress as progress_lib
from quant_core import validation
from quant_core.deploy import packed_layers

PyTree = Any

_LOG = logging.getLogger(__name__)


def pack_model(model, variables: PyTree, state: INQState, batch, *,
               k_tile: Optional[int] = None, progress: bool = False,
               **apply_kwargs) -> PyTree:
  """Packs the quantized kernels of an INQ model (after the portion-1 step).

  Args:
    model: the linen module, an ``apply_fn(variables, batch, **apply_kwargs)``,
      or the NNX module (called as ``model(batch, **apply_kwargs)``).
    variables: the model's variables (``{"params": ...}``; for NNX the pure dict
      of its ``nnx.Param`` state).
    state: the :class:`inq_jax.INQState` of ``variables["params"]``.
    batch: one model input (shapes only), to find each layer's 2-D view.
    k_tile: optional ``K`` step for every layer.
    progress: show a ``tqdm`` bar over the quantized kernels; each packed
      layer is also logged at INFO on the ``inq_jax.packing`` logger.
    **apply_kwargs: passed to the model's apply (e.g. ``train=False``).

  Returns:
    ``variables`` with each quantized kernel a
    :class:`~quant_core.deploy.packed_layers.PackedLayer`. A quantized kernel
    that is not a supported layer's on ``batch`` stays float (its values are
    still on the codebook), and is logged by path.

  Raises:
    ValueError: when the trees differ, or a quantized kernel holds a value
      outside its power-of-two set (the message names the layer).
  """
  variables = jax.device_get(variables)
  validation.check_same_structure(
      jax.tree.map(lambda _: 0, variables["params"]), jax.tree.map(lambda _: 0, state.n1),
      "variables['params']", "state.n1")
  views = layers.layer_views(model, variables, batch, **apply_kwargs)
  selected = state.quantizable_mask(variables["params"])

  def pack_leaf(path, leaf, n1, quantized):
    if not quantized:
      return leaf
    module = paths.path_name(path[:-1])
    view = views.get(module) if paths.key_of(path[-1]) == "kernel" else None
    if view is None:
      _LOG.warning("%s: quantized by INQ but not a supported layer's kernel on the "
                   "batch; stored in float.", paths.path_name(path))
      return leaf
    try:
      packed = packed_layers.pack_pow2_layer(leaf, view, bits=state.bits, n1=n1,
                                             k_tile=k_tile)
    except ValueError as error:
      raise ValueError(f"{module}: {error}") from error
    bar.layer_done("packed %s", module, label=module)
    return packed

  total = sum(bool(quantized) for quantized in jax.tree.leaves(selected))
  with progress_lib.LayerProgress(_LOG, total, "packing", progress) as bar:
    params = jax.tree_util.tree_map_with_path(pack_leaf, variables["params"], state.n1,
                                              selected)
  return dict(variables, params=params)
