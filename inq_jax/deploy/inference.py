"""Packed inference of a quantized Flax (linen) model through ``quantized_matmul``.

Packing (eager, once):

* :func:`pack_quantization` packs the result of ``comq_jax.quantize_model``
  (COMQ, RTN or GPTQ): the settings it carries (bits, grid, granularity,
  group size, which layers) are read from it, and each layer's codes and grid
  parameters are recovered exactly from its de-quantized kernel
  (:func:`inq_jax.deploy.packing.pack_layer_values`). Each kernel becomes a
  :class:`~inq_jax.deploy.packing.PackedLayer`: the packed matrices of its
  2-D view (:mod:`inq_jax.layers`), one per conv feature group.
* :func:`pack_variables` packs an INQ model from its ``INQState``: each
  kernel becomes one :class:`~inq_jax.deploy.packing.PackedPow2` of the
  kernel as it is (leading axes flattened into rows).

Running (:func:`packed_apply`, or :func:`jit_packed_apply` for a cached
jitted version): ``model.apply`` under :func:`inq_jax.layers.intercept_linear_calls`.
Every supported layer (Dense, DenseGeneral, Einsum, Conv with any feature
groups) whose kernel is packed computes its output from its view's rows
(``view.rows(x)``: the input's contracted features, or a conv's im2col
patches) times the packed matrices, then adds its bias; all other modules run
unchanged. So the row order of each layer's 2-D product has one definition,
the view's. A kernel packed whole (:func:`pack_variables`) has its rows in
the kernel's row-major order; the view's rows are permuted to it, the
permutation read off ``view.matrices`` (single-matrix layers only).

* Integer activations: an int8 input takes the kernel's exact integer path;
  the product is float32, cast to the layer's output dtype, plus the bias.
* Float activations: products accumulate in f32; the output has the dtype
  the layer would give (``module.dtype``, else the input promoted with the
  parameters).

NNX models are not supported yet (their kernels cannot hold packed values).

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017.
"""

import functools
import math
import string
from typing import Any, Callable, Optional

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import layers
from inq_jax.deploy import kernels
from inq_jax.deploy import packing
from inq_jax.incremental import INQState

PyTree = Any


def pack_variables(variables: PyTree, state: INQState, *,
                   k_tile: Optional[int] = None) -> PyTree:
  """Packs the quantized kernels of ``variables["params"]`` (INQ).

  Args:
    variables: Flax variables (``{"params": ..., "batch_stats": ...}``) after
      INQ with portion 1.
    state: the :class:`inq_jax.INQState` of ``variables["params"]``.
    k_tile: optional ``K`` step for every layer.

  Returns:
    ``variables`` with packed kernels; the other collections are kept.
  """
  out = dict(variables)
  out["params"] = packing.pack_params(variables["params"], state,
                                      k_tile=k_tile)
  return out


def _node(tree: dict, path: str) -> dict:
  """The sub-dict of ``tree`` at the ``/``-joined module ``path``."""
  for key in path.split("/") if path else ():  # "" is the model itself
    tree = tree[key]
  return tree


def pack_quantization(result, model, batch, *,
                      k_tile: Optional[int] = None, **apply_kwargs) -> PyTree:
  """Packs a post-training quantized model from what the quantizer returned.

  Args:
    result: a ``comq_jax.ModelQuantization`` (COMQ, RTN or GPTQ): its
      ``variables``, its ``layers`` (paths, and view matrices checked against
      the layers') and its ``settings`` (``bits``, ``grid``,
      ``granularity``, ``group_size``) are used.
    model: the linen module it quantized, or the NNX module (e.g.
      ``result.model``; called as ``model(batch, **apply_kwargs)``).
    batch: one model input; only its shape is used, to find each layer's 2-D
      view.
    k_tile: optional ``K`` step for every layer (default per layer).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``) or to
      the NNX module's call.

  Returns:
    ``result.variables`` with each quantized kernel replaced by a
    :class:`~inq_jax.deploy.packing.PackedLayer`; other leaves are kept.
    For an NNX model that is ``{"params": ...}``, the pure dict of its
    ``nnx.Param`` state.

  Raises:
    ValueError: for a quantized layer the batch does not reach or whose view
      differs from the report, or values on no grid of the stated kind (the
      message names the layer).
  """
  settings = result.settings
  return pack_layers(
      result.variables, model, batch,
      {report.path: report.matrices for report in result.layers},
      bits=settings["bits"], grid=settings["grid"],
      granularity=settings["granularity"], group_size=settings["group_size"],
      k_tile=k_tile, **apply_kwargs)


def pack_layers(variables: PyTree, model, batch, layer_paths, *, bits: int,
                grid: str, granularity: str, group_size: Optional[int] = None,
                k_tile: Optional[int] = None, **apply_kwargs) -> PyTree:
  """Packs the kernels of ``layer_paths``, each as its layer's view matrices.

  Each matrix's grid (scales and zero points, or exponents) is recovered
  exactly from its quantized values (:func:`~inq_jax.deploy.packing.pack_layer_values`).

  Args:
    variables: the quantized model's variables (``{"params": ...}``).
    model: a linen module or an NNX module, as in :func:`pack_quantization`.
    batch: one model input (shapes only).
    layer_paths: the ``/``-joined paths of the quantized layers; a mapping
      from path to its expected ``(groups, d_in, d_out)`` matrices (or None)
      also checks the views.
    bits, grid, granularity, group_size: the grid the kernels are on.
    k_tile: optional ``K`` step for every layer.
    **apply_kwargs: as in :func:`pack_quantization`.

  Returns:
    ``variables`` with those kernels replaced by
    :class:`~inq_jax.deploy.packing.PackedLayer`.
  """
  expected = layer_paths if isinstance(layer_paths, dict) else dict.fromkeys(layer_paths)
  variables = jax.device_get(variables)
  views = layers.layer_views(model, variables, batch, **apply_kwargs)
  params = jax.tree.map(lambda leaf: leaf, variables["params"])  # new dicts
  for path, reported in expected.items():
    view = views.get(path)
    if view is None:
      raise ValueError(f"{path}: quantized, but not called as a supported layer on "
                       "the given batch.")
    node = _node(params, path)
    kernel = np.asarray(node["kernel"])
    matrices = view.matrices(kernel)
    if reported is not None and tuple(matrices.shape) != tuple(reported):
      raise ValueError(f"{path}: the layer's view has matrices "
                       f"{tuple(matrices.shape)}, the report says {tuple(reported)}.")
    try:
      node["kernel"] = packing.pack_layer_values(
          matrices, kernel.shape, bits=bits, grid=grid, granularity=granularity,
          group_size=group_size, k_tile=k_tile)
    except ValueError as error:
      raise ValueError(f"{path}: {error}") from error
  return dict(variables, params=params)


def _param(module, name: str):
  """A layer's parameter ``name`` (linen or NNX), or None if it has none."""
  if isinstance(module, nnx.Module):
    variable = getattr(module, name, None)
    return variable.get_value() if isinstance(variable, nnx.Variable) else None
  return module.get_variable("params", name)


def _output_dtype(module, x: jax.Array):
  if module.dtype is not None:
    return module.dtype
  if x.dtype == jnp.int8:
    return jnp.dtype(module.param_dtype)
  return jnp.promote_types(x.dtype, module.param_dtype)


def _product(x: jax.Array, packed, dtype, kernel_options) -> jax.Array:
  """``x @ W`` (``x``: ``(rows, K)``) through the kernel, in ``dtype``."""
  if x.dtype != jnp.int8 and x.dtype not in kernels.FLOAT_DTYPES:
    x = x.astype(dtype)
  return kernels.quantized_matmul(x, packed, **kernel_options).astype(dtype)


def _kernel_row_order(name: str, view) -> np.ndarray:
  """For a kernel packed whole: the view's row feeding each row of the
  kernel's ``(prod(shape[:-1]), shape[-1])`` matrix.

  Read off ``view.matrices`` applied to the kernel's flat indices: the view
  must be one matrix whose columns are the kernel's last axis.
  """
  shape = view.kernel_shape
  n = shape[-1]
  index = view.matrices(np.arange(math.prod(shape)).reshape(shape))
  if view.groups != 1 or index.shape[-1] != n or np.any(
      index[0] % n != np.arange(n)):
    raise ValueError(
        f"{name}: a kernel packed whole (pack_variables) runs only layers whose "
        f"view is one matrix over the kernel's last axis, got {view.groups} "
        "feature groups (feature_group_count) or other output axes; pack the "
        "layer's view matrices instead (pack_quantization).")
  return np.argsort(index[0, :, 0] // n)


def _view_product(name: str, view, rows: jax.Array, kernel, dtype,
                  kernel_options) -> jax.Array:
  """``(R, groups, d_out)``: each group's rows times its packed matrix."""
  if not isinstance(kernel, packing.PackedLayer):
    order = _kernel_row_order(name, view)
    return _product(rows[:, 0][:, order], kernel, dtype, kernel_options)[:, None]
  expected = (view.kernel_shape, view.groups, (view.d_in, view.d_out))
  found = (kernel.kernel_shape, kernel.groups, kernel.matrices.shape)
  if found != expected:
    raise ValueError(f"{name}: packed for kernel shape, groups and matrix "
                     f"{found}, but the layer has {expected}.")
  if kernel.groups == 1:
    return _product(rows[:, 0], kernel.group(0), dtype, kernel_options)[:, None]
  return jax.vmap(lambda x, packed: _product(x, packed, dtype, kernel_options),
                  in_axes=(1, 0), out_axes=1)(rows, kernel.matrices)


def _einsum_layout(equation: str, kernel_shape, x: jax.Array):
  """``(permutation, bias shape)`` taking an einsum's ``(kept input axes,
  kernel features)`` product to its output axes, and its bias to them."""
  equation = equation.replace(" ", "")
  operands, out = equation.split("->")
  lhs, rhs = operands.split(",")
  if "..." in lhs:
    spare = [c for c in string.ascii_letters if c not in equation]
    fill = "".join(spare[:x.ndim - (len(lhs) - 3)])
    lhs, out = lhs.replace("...", fill), out.replace("...", fill)
  produced = [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
  kernel_axes = {c: i for i, c in enumerate(rhs)}
  bias_shape = tuple(kernel_shape[kernel_axes[c]] if c in kernel_axes else 1
                     for c in out)
  return tuple(produced.index(c) for c in out), bias_shape


def _layer_output(call, y: jax.Array, dtype) -> jax.Array:
  """The layer's output from its ``(R, groups, d_out)`` product, bias added."""
  module, view, x = call.module, call.view, call.inputs
  row_shape = view.row_shape(x.shape)
  bias_shape = None
  if isinstance(view, layers.Convolution):
    if x.ndim == len(view.kernel_size) + 1:  # an unbatched input
      row_shape = row_shape[1:]
    y = y.reshape(row_shape + (view.kernel_shape[-1],))
  else:
    features = tuple(view.kernel_shape[a]
                     for a in view.kernel_perm[view.num_contracted:])
    y = y.reshape(row_shape + features)
    if isinstance(module, (nn.Einsum, nnx.Einsum)):
      order, bias_shape = _einsum_layout(module.einsum_str, view.kernel_shape, x)
      y = jnp.transpose(y, order)
  bias = _param(module, "bias")
  if bias is None:
    return y
  bias = bias.astype(dtype)
  if bias_shape is None:
    bias_shape = (1,) * (y.ndim - bias.ndim) + bias.shape
  return y + bias.reshape(bias_shape)


def _interceptor(kernel_options):
  """Routes calls of layers with packed kernels through the kernel."""

  def on_call(call):
    kernel = _param(call.module, "kernel")
    if not packing.is_packed_kernel(kernel):
      return None
    name = layers.path_name(call.path)
    if call.view is None:
      raise ValueError(f"{name} ({call.kind}) has a packed kernel but no 2-D "
                       f"view: {call.reason}.")
    dtype = _output_dtype(call.module, call.inputs)
    y = _view_product(name, call.view, call.view.rows(call.inputs), kernel,
                      dtype, kernel_options)
    return _layer_output(call, y, dtype)

  return on_call


def packed_apply(model, packed_variables: PyTree, *args,
                 block_m: Optional[int] = None, block_n: Optional[int] = None,
                 interpret: Optional[bool] = None, **kwargs):
  """``model.apply`` with every packed kernel run by ``quantized_matmul``.

  Args:
    model: a Flax linen module, or an NNX module: a copy of it with
      ``packed_variables["params"]`` as its ``nnx.Param`` state (its other
      state, e.g. batch statistics, its own) is called; ``model`` is not
      changed.
    packed_variables: from :func:`pack_quantization`, :func:`pack_variables`
      or :func:`inq_jax.deploy.files.load_packed`.
    *args: inputs to ``model.apply`` (e.g. images; int8 inputs to a packed
      first layer take the exact integer path).
    block_m: optional kernel block override, see
      :func:`inq_jax.deploy.quantized_matmul`.
    block_n: optional kernel block override.
    interpret: optional interpret-mode override.
    **kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    What ``model.apply`` (or the NNX module's call) returns.

  Raises:
    ValueError: for a packed layer without a 2-D view, or whose packed shape
      does not match the layer (the message names the layer).
  """
  on_call = _interceptor(dict(block_m=block_m, block_n=block_n, interpret=interpret))
  if isinstance(model, nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda leaf: leaf, params)  # the user's module keeps its own
    nnx.replace_by_pure_dict(params, packed_variables["params"])
    packed_model = nnx.merge(graphdef, params, rest)
    with layers.intercept_nnx_linear_calls(packed_model, on_call):
      return packed_model(*args, **kwargs)
  with nn.intercept_methods(layers.intercept_linear_calls(on_call)):
    return model.apply(packed_variables, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _jitted(model, options: tuple, apply_kwargs: tuple) -> Callable:
  return jax.jit(lambda packed_variables, *args: packed_apply(
      model, packed_variables, *args, **dict(options), **dict(apply_kwargs)))


@functools.lru_cache(maxsize=None)
def _jitted_nnx(graphdef, options: tuple, apply_kwargs: tuple) -> Callable:
  return jax.jit(lambda state, packed_variables, *args: packed_apply(
      nnx.merge(graphdef, state), packed_variables, *args, **dict(options),
      **dict(apply_kwargs)))


def jit_packed_apply(model, *, block_m: Optional[int] = None,
                     block_n: Optional[int] = None,
                     interpret: Optional[bool] = None,
                     **apply_kwargs) -> Callable:
  """The jitted :func:`packed_apply` of ``model``, cached.

  One jitted function per (model, options) is kept, so calls with the same
  input shapes (and the same packed layouts) compile once, even across calls
  of this function with an equal model.

  Args:
    model: a hashable Flax linen module (linen modules are), or an NNX
      module. An NNX module is keyed by its graph definition (its structure
      and static attributes, not its arrays), and every call reads its state
      as it is then: batch statistics updated between calls are used, and
      the cache holds no module.
    block_m: as :func:`packed_apply`.
    block_n: as :func:`packed_apply`.
    interpret: as :func:`packed_apply`.
    **apply_kwargs: static keyword arguments of ``model.apply`` (hashable,
      e.g. ``train=False``).

  Returns:
    ``fn(packed_variables, *args)`` returning what ``model.apply`` returns.
  """
  options = tuple(sorted(dict(block_m=block_m, block_n=block_n,
                              interpret=interpret).items()))
  apply_kwargs = tuple(sorted(apply_kwargs.items()))
  if not isinstance(model, nnx.Module):
    return _jitted(model, options, apply_kwargs)
  graphdef, _ = nnx.split(model)
  jitted = _jitted_nnx(graphdef, options, apply_kwargs)
  return lambda packed_variables, *args: jitted(nnx.state(model), packed_variables, *args)


def evaluate_packed(model: nn.Module, variables: PyTree, state: INQState,
                    *args, **kwargs):
  """Packs an INQ-quantized model and runs it through the kernel (jitted).

  The jitted apply is :func:`jit_packed_apply`'s, so repeated calls with the
  same input shapes compile once. To pack only once as well, call
  :func:`pack_variables` once and the function of :func:`jit_packed_apply`.

  Args:
    model: the Flax module (hashable, as linen modules are).
    variables: its variables after INQ with portion 1.
    state: the final :class:`inq_jax.INQState`.
    *args: inputs for ``model.apply``.
    **kwargs: keyword arguments for ``model.apply`` (static, e.g.
      ``train=False``).

  Returns:
    The model outputs.
  """
  return jit_packed_apply(model, **kwargs)(pack_variables(variables, state),
                                           *args)
