"""Packed inference of a quantized Flax model (linen or NNX) through ``quantized_matmul``.

Packing (eager, once) gives every kernel one representation, a
:class:`~quant_core.deploy.packed_layers.PackedLayer`: the packed matrices of its
2-D view (:mod:`quant_core.layers`), one per conv feature group.

* :func:`pack_quantization` packs the result of ``comq_jax.quantize_model``
  (COMQ, RTN or GPTQ) from the codes each solver produced: a re-layout.
* ``inq_jax.pack_model`` packs an INQ model from its ``INQState`` (the powers
  of two encoded under each layer's known ``n1``).
* :func:`pack_layers` packs float kernels whose codes are lost (a user's own
  grid-valued weights, a checkpoint) by recovering each grid from its values.

Running (:func:`packed_apply`, or :func:`jit_packed_apply` for a cached jitted
version): the model under :func:`quant_core.layers.intercept_linear_calls` (linen)
or :class:`quant_core.layers.intercept_nnx_linear_calls` (NNX). Every supported
layer (Dense, DenseGeneral, Einsum, Conv with any feature groups) whose kernel is
packed computes its output from its view's rows (``view.rows(x)``: the input's
contracted features, or a conv's im2col patches) times the packed matrices, then
adds its bias; all other modules run unchanged. So the row order of each layer's
2-D product has one definition, the view's. The feature groups of a grouped or
depthwise conv run as one kernel call.

* Integer activations: an int8 input takes the kernel's exact integer path;
  the product is float32, cast to the layer's output dtype, plus the bias.
* Float activations: products accumulate in f32; the output has the dtype
  the layer would give (``module.dtype``, else the input promoted with the
  parameters).

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017.
"""

import functools
import logging
import string
from typing import Any, Callable, Optional

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from quant_core import layers
from quant_core import nnx_params
from quant_core import paths
from quant_core import progress as progress_lib
from quant_core.deploy import kernels
from quant_core.deploy import packed_layers
from quant_core.deploy import recover

_LOG = logging.getLogger(__name__)

PyTree = Any


def _set_kernel(params: dict, path: str, kernel) -> None:
  """Puts ``kernel`` at the ``/``-joined module ``path`` of a params tree."""
  # "" is the model itself
  paths.get(params, path.split("/") if path else ())["kernel"] = kernel


def pack_quantization(result, *, k_tile: Optional[int] = None,
                      progress: bool = False) -> PyTree:
  """Packs a post-training quantized model from its solvers' codes.

  Each layer's codes, scales and zero points (or exponents) are the ones its
  solver produced (``report.quantization``, scale updates included), laid out
  over the layer's view (``report.view``): nothing is recovered from the float
  values.

  Args:
    result: a ``comq_jax.ModelQuantization`` (COMQ, RTN or GPTQ, any rules).
    k_tile: optional ``K`` step for every layer (default per layer).
    progress: show a ``tqdm`` bar over the layers; each packed layer is also
      logged at INFO on the ``quant_core.deploy.inference`` logger.

  Returns:
    ``result.variables`` with each quantized kernel replaced by a
    :class:`~quant_core.deploy.packed_layers.PackedLayer`; other leaves are kept.
    For an NNX model that is ``{"params": ...}``, the pure dict of its
    ``nnx.Param`` state.

  Raises:
    ValueError: for a report without its codes (a result rebuilt from a record:
      pack its float weights with :func:`pack_layers`), a grid the packed format
      cannot hold exactly, or a kernel that is not the one its codes decode to
      (the message names the layer).
  """
  if not hasattr(result, "layers") or not hasattr(result, "variables"):
    raise ValueError("pack_quantization takes what comq_jax.quantize_model returns (a "
                     f"ModelQuantization), got {type(result).__name__}; float weights on a "
                     "grid pack with pack_layers.")
  variables = jax.device_get(result.variables)
  params = jax.tree.map(lambda leaf: leaf, variables["params"])  # new dicts
  with progress_lib.LayerProgress(_LOG, len(result.layers), "packing", progress) as bar:
    for index, report in enumerate(result.layers):
      _pack_reported_layer(params, report, k_tile)
      bar.layer_done("packed %d/%d %s", index + 1, len(result.layers), report.path,
                     label=report.path)
  return dict(variables, params=params)


def _pack_reported_layer(params, report, k_tile) -> None:
  """Replaces the report's kernel in ``params`` by its packed codes."""
  if report.quantization is None or report.view is None:
    raise ValueError(f"{report.path}: the report holds no codes (rebuilt from a "
                     "record?); pack its float weights with pack_layers instead.")
  if report.solver is not None and report.solver.scalar != 1.0:
    raise ValueError(
        f"{report.path}: quantized with scalar={report.solver.scalar}; the levels "
        "scalar·(z + t)·step are not scale·(code - zero_point) to the bit, so the "
        "packed weights would not equal the quantized ones. Pack a scalar=1 result.")
  kernel = paths.get(params, report.path.split("/") if report.path else ())["kernel"]
  try:
    packed = packed_layers.pack_quantized_layer(report.quantization, report.view,
                                                dtype=kernel.dtype, k_tile=k_tile)
  except ValueError as error:
    raise ValueError(f"{report.path}: {error}") from error
  # The codes must stand for the kernel the result holds (not one changed since).
  if not np.array_equal(np.asarray(packed_layers.unpack_layer(packed)), np.asarray(kernel)):
    raise ValueError(f"{report.path}: the kernel in result.variables is not the one its "
                     "codes decode to (changed after quantization?); pack the kernels "
                     "with pack_layers, or quantize again.")
  _set_kernel(params, report.path, packed)


def pack_layers(variables: PyTree, model, batch, layer_paths, *, bits: int,
                grid: str, granularity: str, group_size: Optional[int] = None,
                k_tile: Optional[int] = None, progress: bool = False,
                **apply_kwargs) -> PyTree:
  """Packs float kernels that lie on a grid, recovering each grid from its values.

  For weights whose codes are lost (a user's own grid-valued or power-of-two
  tree, a checkpoint of a quantized model): each view matrix's scales and zero
  points (or exponents) are recovered exactly from its values
  (:func:`~quant_core.deploy.recover.pack_layer_values`). A quantization result
  with its codes packs with :func:`pack_quantization` instead.

  Args:
    variables: the quantized model's variables (``{"params": ...}``).
    model: a linen module or an NNX module (called as ``model(batch,
      **apply_kwargs)``).
    batch: one model input (shapes only), to find each layer's 2-D view.
    layer_paths: the ``/``-joined paths of the quantized layers; a mapping
      from path to its expected ``(groups, d_in, d_out)`` matrices (or None)
      also checks the views.
    bits, grid, granularity, group_size: the grid the kernels are on.
    k_tile: optional ``K`` step for every layer.
    progress: as for :func:`pack_quantization`.
    **apply_kwargs: passed to the model's apply (e.g. ``train=False``).

  Returns:
    ``variables`` with those kernels replaced by
    :class:`~quant_core.deploy.packed_layers.PackedLayer`.

  Raises:
    ValueError: for a layer the batch does not reach, a view that differs from
      the expected matrices, or values on no grid of the stated kind (the
      message names the layer).
  """
  expected = layer_paths if isinstance(layer_paths, dict) else dict.fromkeys(layer_paths)
  variables = jax.device_get(variables)
  views = layers.layer_views(model, variables, batch, **apply_kwargs)
  params = jax.tree.map(lambda leaf: leaf, variables["params"])  # new dicts
  with progress_lib.LayerProgress(_LOG, len(expected), "packing", progress) as bar:
    for index, (path, reported) in enumerate(expected.items()):
      _pack_layer_values(params, path, reported, views.get(path),
                         dict(bits=bits, grid=grid, granularity=granularity,
                              group_size=group_size, k_tile=k_tile))
      bar.layer_done("packed %d/%d %s", index + 1, len(expected), path, label=path)
  return dict(variables, params=params)


def _pack_layer_values(params, path, reported, view, grid_options) -> None:
  """Replaces the kernel at ``path`` by codes recovered from its values."""
  if view is None:
    raise ValueError(f"{path}: quantized, but not called as a supported layer on "
                     "the given batch.")
  found = (view.groups, view.d_in, view.d_out)
  if reported is not None and found != tuple(reported):
    raise ValueError(f"{path}: the layer's view has matrices {found}, the report "
                     f"says {tuple(reported)}.")
  kernel = paths.get(params, path.split("/") if path else ())["kernel"]
  try:
    packed = recover.pack_layer_values(kernel, view, **grid_options)
  except ValueError as error:
    raise ValueError(f"{path}: {error}") from error
  _set_kernel(params, path, packed)


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
  """``x @ W`` through the kernel, in ``dtype``: ``x`` ``(rows, K)`` times one
  matrix, or ``(rows, groups, K)`` times a layer's stacked group matrices in one
  kernel call."""
  if x.dtype != jnp.int8 and x.dtype not in kernels.FLOAT_DTYPES:
    x = x.astype(dtype)
  matmul = kernels.quantized_matmul if x.ndim == 2 else kernels.grouped_quantized_matmul
  return matmul(x, packed, **kernel_options).astype(dtype)


def _view_product(name: str, view, rows: jax.Array, kernel, dtype,
                  kernel_options) -> jax.Array:
  """``(R, groups, d_out)``: each group's rows times its packed matrix."""
  if not isinstance(kernel, packed_layers.PackedLayer):
    raise ValueError(f"{name}: its kernel is a bare packed weight; packed_apply runs "
                     "PackedLayer kernels, the packed matrices of the layer's view "
                     "(pack_quantization, pack_layers, inq_jax.pack_model).")
  expected = (view.kernel_shape, view.groups, (view.d_in, view.d_out))
  found = (kernel.kernel_shape, kernel.groups, kernel.matrices.shape)
  if found != expected:
    raise ValueError(f"{name}: packed for kernel shape, groups and matrix "
                     f"{found}, but the layer has {expected}.")
  if kernel.groups == 1:
    return _product(rows[:, 0], kernel.group(0), dtype, kernel_options)[:, None]
  return _product(rows, kernel.matrices, dtype, kernel_options)


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
    if not packed_layers.is_packed_kernel(kernel):
      return None
    name = paths.path_name(call.path)
    if call.view is None:
      raise ValueError(f"{name} ({call.kind}) has a packed kernel but no 2-D "
                       f"view: {call.reason}.")
    dtype = _output_dtype(call.module, call.inputs)
    y = _view_product(name, call.view, call.view.rows(call.inputs), kernel,
                      dtype, kernel_options)
    return _layer_output(call, y, dtype)

  return on_call


def _check_tree(model, packed_variables, args, kwargs) -> None:
  """Raises ValueError unless the packed params have the module's parameter
  paths and (logical) shapes: an NNX module's own ``nnx.Param`` state, or what
  a linen module's ``init`` makes for these inputs."""
  if not isinstance(packed_variables, dict) or "params" not in packed_variables:
    raise ValueError("packed_variables must be a dict with a 'params' collection (from "
                     "pack_quantization, pack_layers, inq_jax.pack_model or load_packed), "
                     f"got {type(packed_variables).__name__}.")
  if isinstance(model, nnx.Module):
    expected = packed_layers.logical_shapes(model)
  else:
    try:
      rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
      shapes = jax.eval_shape(lambda *inputs: model.init(rngs, *inputs, **kwargs), *args)
    except Exception:  # pylint: disable=broad-except
      # init differs from apply for some modules (extra rngs, init-only
      # arguments); the per-layer checks of the interceptor still apply.
      return
    expected = packed_layers.logical_shapes({"params": shapes["params"]})
  found = packed_layers.logical_shapes({"params": packed_variables["params"]})
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  if missing or extra:
    raise ValueError(f"the packed variables do not hold this module's parameters: "
                     f"missing {missing[:5]}, unexpected {extra[:5]}.")
  differ = [f"{name} is {found[name]} in the packed variables, the module's is "
            f"{expected[name]}" for name in sorted(expected) if found[name] != expected[name]]
  if differ:
    try:  # inputs that do not fit the packed layers: say that rather
      jax.eval_shape(lambda *inputs: _run(model, packed_variables, inputs, kwargs,
                                          _interceptor({})), *args)
    except layers.InputShapeMismatch as error:
      raise ValueError(str(error)) from None
    except Exception:  # pylint: disable=broad-except
      pass  # the mismatch below is the error to report
    raise ValueError("the packed variables do not fit this module: " + "; ".join(differ[:5])
                     + ".")


def packed_apply(model, packed_variables: PyTree, *args,
                 block_m: Optional[int] = None, block_n: Optional[int] = None,
                 interpret: Optional[bool] = None, **kwargs):
  """``model.apply`` with every packed kernel run by ``quantized_matmul``.

  Args:
    model: a Flax linen module, or an NNX module: a copy of it with
      ``packed_variables["params"]`` as its ``nnx.Param`` state (its other
      state, e.g. batch statistics, its own) is called; ``model`` is not
      changed.
    packed_variables: from :func:`pack_quantization`, ``inq_jax.pack_model``,
      :func:`pack_layers`
      or :func:`quant_core.deploy.files.load_packed`.
    *args: inputs to ``model.apply`` (e.g. images; int8 inputs to a packed
      first layer take the exact integer path).
    block_m: optional kernel block override, see
      :func:`quant_core.deploy.quantized_matmul`.
    block_n: optional kernel block override.
    interpret: optional interpret-mode override.
    **kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    What ``model.apply`` (or the NNX module's call) returns.

  Raises:
    ValueError: for a packed layer without a 2-D view, whose packed shape does
      not match the layer, or a bare packed weight that is not a
      :class:`~quant_core.deploy.packed_layers.PackedLayer` (the message names
      the layer).
  """
  on_call = _interceptor(dict(block_m=block_m, block_n=block_n, interpret=interpret))
  _check_tree(model, packed_variables, args, kwargs)
  if not any(packed_layers.is_packed_kernel(leaf) for leaf in jax.tree.leaves(
      packed_variables["params"], is_leaf=packed_layers.is_packed_kernel)):
    _LOG.warning("packed_apply: packed_variables hold no packed kernel; the model runs "
                 "in float.")
  return _run(model, packed_variables, args, kwargs, on_call)


def _run(model, packed_variables, args, kwargs, on_call):
  """The module on ``args`` with its packed layers routed through ``on_call``."""
  if isinstance(model, nnx.Module):
    packed_model = nnx_params.NNXParams(model).with_params(packed_variables["params"])
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


