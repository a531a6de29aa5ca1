"""Which modules of a Flax model are quantizable linear layers, and their 2-D view.

The one definition of "a quantizable layer" shared by INQ's default predicate,
COMQ, round-to-nearest, GPTQ, packing, packed inference and the experiments:

* a **parameter** view: a leaf named ``kernel`` with ``ndim >= 2``
  (:func:`default_quantizable`), for transforms that see only the params pytree;
* a **module** view: a call of a linear layer, found by interception without
  rewriting the user's model (:func:`intercept_linear_calls` for linen,
  :func:`intercept_nnx_linear_calls` for NNX), and its :class:`LinearView`:
  the layer as ``groups`` independent matrices ``(d_in, d_out)`` multiplying
  rows of its input.

Supported layer kinds, subclasses included (a subclass that overrides
``__call__`` is seen where it calls the base layer's ``__call__``):

========================  ==========================  ==============================
linen                     NNX                         2-D view
========================  ==========================  ==============================
``nn.Dense``              ``nnx.Linear``              the kernel as it is
``nn.DenseGeneral``       ``nnx.LinearGeneral``       ``(prod(in axes), prod(features))``
``nn.Einsum``             ``nnx.Einsum``              contracted axes x kernel-only axes
``nn.Conv``               ``nnx.Conv``                per feature group, over im2col patches
========================  ==========================  ==============================

An einsum qualifies when it contracts the input with the kernel: two operands,
every kernel axis either contracted with an input axis (and absent from the
output) or a feature axis (absent from the input, present in the output), at
least one contracted axis, every other input axis kept in the output, and no
repeated index. ``...`` may stand for input/output axes, not kernel axes.

Layers of a supported kind that cannot be viewed as matrices raise
:class:`UnsupportedLayer` with the reason: ``DenseGeneral``/``LinearGeneral``
with batch axes, a non-qualifying einsum, a kernel of the wrong rank, masked
convs, circular or causal padding. Other linear-like modules
(``ConvTranspose``, ``ConvLocal``) are named by :data:`LINEAR_LIKE`.
"""

import dataclasses
import inspect
import math
import string
from typing import Any, Callable, Optional

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from quant_core import im2col
from quant_core import paths as paths_lib

PyTree = Any
Predicate = Callable[[Any, Any], bool]


def default_quantizable(path, leaf) -> bool:
  """True for linear-layer kernels (a leaf named ``kernel``, ndim >= 2).

  Biases, normalisation scales and offsets, embeddings and batch statistics
  are left in float. The first and last layers are included, as in the INQ
  paper.
  """
  last = path[-1] if path else None
  return last is not None and paths_lib.key_of(last) == "kernel" and jnp.ndim(leaf) >= 2


def quantizable_mask(params: PyTree,
                     predicate: Optional[Predicate] = None) -> PyTree:
  """A pytree of Python bools parallel to ``params``: the quantizable leaves.

  Args:
    params: a parameter pytree (arrays or shape-dtype structs).
    predicate: ``(key_path, leaf) -> bool``; defaults to
      :func:`default_quantizable`.

  Returns:
    Static bools, usable as an ``optax.masked`` mask.
  """
  predicate = predicate or default_quantizable
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: bool(predicate(path, leaf)), params)


class UnsupportedLayer(ValueError):
  """A layer of a supported kind whose configuration has no 2-D view."""


class InputShapeMismatch(ValueError):
  """A layer called on inputs whose contracted axes do not fit its kernel."""


@dataclasses.dataclass(frozen=True)
class Contraction:
  """A layer computing ``inputs`` contracted with its kernel (Dense, DenseGeneral,
  Einsum).

  Attributes:
    input_axes: the contracted input axes (non-negative), in kernel order.
    kernel_perm: kernel axes reordered as (contracted..., features...).
    kernel_shape: the kernel's shape.
    num_contracted: how many kernel axes are contracted.
  """
  input_axes: tuple
  kernel_perm: tuple
  kernel_shape: tuple
  num_contracted: int

  groups = 1

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[a]
                     for a in self.kernel_perm[:self.num_contracted])

  @property
  def d_out(self) -> int:
    return math.prod(self.kernel_shape[a]
                     for a in self.kernel_perm[self.num_contracted:])

  def row_shape(self, inputs_shape) -> tuple:
    """Shape of the row axes: the input axes that are not contracted."""
    return tuple(size for axis, size in enumerate(inputs_shape)
                 if axis not in self.input_axes)

  def rows(self, inputs: jax.Array) -> jax.Array:
    """The inputs as rows ``(rows, 1, d_in)``, row axes in input order."""
    kept = [a for a in range(inputs.ndim) if a not in self.input_axes]
    moved = jnp.transpose(inputs, kept + list(self.input_axes))
    return moved.reshape(-1, 1, self.d_in)

  def gram(self, inputs: jax.Array, row_weight=None) -> jax.Array:
    """``(1, d_in, d_in)`` float32 Gram of the rows, each row times its weight."""
    return _rows_gram(self.rows(inputs), row_weight)

  def matrices(self, kernel: jax.Array) -> jax.Array:
    """The kernel as ``(1, d_in, d_out)``; row ``i`` multiplies feature ``i``.

    Here and in :meth:`kernel`, numpy arrays stay numpy (no device work)."""
    return kernel.transpose(self.kernel_perm).reshape(1, self.d_in, self.d_out)

  def kernel(self, matrices: jax.Array) -> jax.Array:
    """Inverse of :meth:`matrices`."""
    permuted = matrices.reshape(tuple(self.kernel_shape[a] for a in self.kernel_perm))
    inverse = tuple(self.kernel_perm.index(a) for a in range(len(self.kernel_perm)))
    return permuted.transpose(inverse)


@dataclasses.dataclass(frozen=True)
class Convolution:
  """A convolution (``nn.Conv``/``nnx.Conv``) as ``groups`` matrices over patches.

  The attribute names are those of ``nn.Conv``, so :mod:`quant_core.im2col`
  reads the view like a module.
  """
  kernel_shape: tuple
  strides: Any
  padding: Any
  input_dilation: Any
  kernel_dilation: Any
  feature_group_count: int

  mask = None

  @property
  def kernel_size(self) -> tuple:
    return tuple(self.kernel_shape[:-2])

  @property
  def groups(self) -> int:
    return self.feature_group_count

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[:-1])

  @property
  def d_out(self) -> int:
    return self.kernel_shape[-1] // self.groups

  def _batched(self, inputs):
    # Like the layers, an input without a batch axis is one example.
    rank = len(self.kernel_size)
    return inputs[None] if inputs.ndim == rank + 1 else inputs

  def row_shape(self, inputs_shape) -> tuple:
    """Shape of the row axes: the batch axes and the output positions."""
    probe = jax.eval_shape(
        lambda x: im2col.conv_patches(self, self._batched(x)),
        jax.ShapeDtypeStruct(tuple(inputs_shape), jnp.float32))
    return tuple(probe.shape[:-1])

  def rows(self, inputs: jax.Array) -> jax.Array:
    """The im2col patches as rows ``(rows, groups, d_in)``."""
    patches = im2col.conv_patches(self, self._batched(inputs))
    return patches.reshape(-1, self.groups, self.d_in)

  def gram(self, inputs: jax.Array, row_weight=None) -> jax.Array:
    """``(groups, d_in, d_in)`` float32 Gram of each group's patch rows, each
    row times its weight (:func:`quant_core.im2col.patch_gram`, which avoids
    forming the patches where it can)."""
    x = self._batched(inputs)
    rank = len(self.kernel_size)
    return im2col.patch_gram(self, x.reshape((-1,) + x.shape[-(rank + 1):]),
                             self.groups, row_weight)

  def matrices(self, kernel: jax.Array) -> jax.Array:
    """The kernel as ``(groups, d_in, d_out)`` in patch-feature order."""
    return im2col.conv_kernel_matrix(kernel, self.groups)

  def kernel(self, matrices: jax.Array) -> jax.Array:
    """Inverse of :meth:`matrices`."""
    return im2col.kernel_from_matrix(matrices, self.kernel_shape)


LinearView = Contraction | Convolution

def _rows_gram(rows, row_weight):
  rows = rows.astype(jnp.float32)
  weighted = rows if row_weight is None else rows * row_weight[:, None, None]
  return jnp.einsum("rgf,rgh->gfh", weighted, rows, precision=jax.lax.Precision.HIGHEST)

# Linear in the weights, but without a per-output-channel matrix view here.
LINEAR_LIKE = (nn.ConvTranspose, nn.ConvLocal, nnx.ConvTranspose)


def _tuple(value):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _normalize_axes(axes, ndim, what):
  normalized = []
  for axis in axes:
    if not -ndim <= axis < ndim:
      # The layer contracts that axis: the input lacks it.
      raise InputShapeMismatch(f"{what} {axis} is out of range for an input of rank {ndim}")
    normalized.append(axis % ndim)
  return tuple(normalized)


def _check_rank(kind, kernel_shape, expected):
  if len(kernel_shape) != expected:
    raise UnsupportedLayer(
        f"{kind} kernel has rank {len(kernel_shape)} (shape {tuple(kernel_shape)}); "
        f"this layer allows rank {expected}")


def _general_view(kind, inputs_shape, kernel_shape, axis, batch_axes):
  if batch_axes:
    raise UnsupportedLayer(
        f"{kind} with batch axes {tuple(batch_axes)} has one weight matrix per batch "
        f"index, which is not a single linear layer; only batch_dims=() is supported")
  axes = _normalize_axes(_tuple(axis), len(inputs_shape), "axis")
  if len(kernel_shape) <= len(axes):
    _check_rank(kind, kernel_shape, len(axes) + 1)
  contracted = tuple(kernel_shape[:len(axes)])
  given = tuple(inputs_shape[a] for a in axes)
  if contracted != given:
    expected = (f"{contracted[0]} input features" if len(axes) == 1 else
                f"input axes {axes} of sizes {contracted}")
    raise InputShapeMismatch(
        f"{kind} with kernel {tuple(kernel_shape)}: expected {expected}, got "
        f"{given[0] if len(axes) == 1 else given} (an input of shape "
        f"{tuple(inputs_shape)})")
  return Contraction(input_axes=axes, kernel_perm=tuple(range(len(kernel_shape))),
                     kernel_shape=tuple(kernel_shape), num_contracted=len(axes))


def einsum_view(equation: str, inputs_shape, kernel_shape) -> Contraction:
  """The 2-D view of ``einsum(equation, inputs, kernel)``.

  Raises:
    UnsupportedLayer: when the equation is not a weight contraction (see the
      module docstring for which equations qualify).
  """
  text = equation.replace(" ", "")
  where = f"einsum {equation!r}"
  if "->" not in text or text.count(",") != 1:
    raise UnsupportedLayer(f"{where}: need an explicit 'input,kernel->output' equation")
  operands, out = text.split("->")
  lhs, rhs = operands.split(",")
  if "." in rhs:
    raise UnsupportedLayer(f"{where}: '...' on the kernel operand is not supported")
  if "..." in lhs:
    spare = [c for c in string.ascii_letters if c not in text]
    fill = "".join(spare[:len(inputs_shape) - (len(lhs) - 3)])
    lhs, out = lhs.replace("...", fill), out.replace("...", fill)
  if "." in lhs + out:
    raise UnsupportedLayer(f"{where}: '...' must appear on both the input and the output")
  for name, indices in (("input", lhs), ("kernel", rhs), ("output", out)):
    if len(set(indices)) != len(indices):
      raise UnsupportedLayer(f"{where}: repeated index on the {name}")
  if len(lhs) != len(inputs_shape) or len(rhs) != len(kernel_shape):
    raise UnsupportedLayer(
        f"{where}: the equation has {len(lhs)} input and {len(rhs)} kernel axes, the "
        f"input has shape {tuple(inputs_shape)} and the kernel {tuple(kernel_shape)}")
  for index in rhs:
    if index in lhs and index in out:
      raise UnsupportedLayer(
          f"{where}: kernel axis '{index}' indexes the input and the output alike (a "
          f"weight per batch index), not a weight contraction")
    if index not in lhs and index not in out:
      raise UnsupportedLayer(f"{where}: kernel axis '{index}' is summed away")
  for index in lhs:
    if index not in rhs and index not in out:
      raise UnsupportedLayer(f"{where}: input axis '{index}' is summed without the kernel")
  contracted = [c for c in rhs if c in lhs]
  if not contracted:
    raise UnsupportedLayer(f"{where}: no input axis is contracted with the kernel")
  features = [c for c in rhs if c not in lhs]
  return Contraction(input_axes=tuple(lhs.index(c) for c in contracted),
                     kernel_perm=tuple(rhs.index(c) for c in contracted + features),
                     kernel_shape=tuple(kernel_shape), num_contracted=len(contracted))


def _conv_view(kind, module, inputs_shape, kernel_shape):
  rank = len(_tuple(module.kernel_size))
  _check_rank(kind, kernel_shape, rank + 2)
  if len(inputs_shape) < rank + 1:
    raise UnsupportedLayer(f"{kind} with {rank} spatial axes got an input of shape "
                           f"{tuple(inputs_shape)}")
  if getattr(module, "mask", None) is not None:
    raise UnsupportedLayer(f"{kind} with a kernel mask is not supported")
  padding = nn.linear.canonicalize_padding(module.padding, rank)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise UnsupportedLayer(f"{kind} with padding {padding!r} is not supported; "
                           f"use SAME, VALID or explicit padding")
  hashable = lambda value: tuple(map(hashable, value)) if isinstance(
      value, (tuple, list)) else value
  return Convolution(kernel_shape=tuple(kernel_shape), strides=hashable(module.strides),
                     padding=hashable(padding),
                     input_dilation=hashable(module.input_dilation),
                     kernel_dilation=hashable(module.kernel_dilation),
                     feature_group_count=module.feature_group_count)


def _dense_view(kind, inputs_shape, kernel_shape):
  _check_rank(kind, kernel_shape, 2)
  return _general_view(kind, inputs_shape, kernel_shape, -1, ())


def _dense_general_view(module, inputs_shape, kernel_shape):
  return _general_view("nn.DenseGeneral", inputs_shape, kernel_shape, module.axis,
                       _tuple(module.batch_dims) if module.batch_dims else ())


def _linear_general_view(module, inputs_shape, kernel_shape):
  return _general_view("nnx.LinearGeneral", inputs_shape, kernel_shape, module.axis,
                       tuple(module.batch_axis))


def _einsum_equation(module, args, kwargs):
  call_equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
  return call_equation if call_equation is not None else module.einsum_str


@dataclasses.dataclass(frozen=True)
class _Kind:
  """A supported layer class, its base ``__call__`` and how to view it."""
  cls: type
  name: str
  view: Callable  # (module, args, kwargs, inputs_shape, kernel_shape) -> LinearView

  @property
  def base_call(self):
    return inspect.unwrap(self.cls.__call__)


KINDS = (
    _Kind(nn.Dense, "nn.Dense", lambda m, a, k, x, w: _dense_view("nn.Dense", x, w)),
    _Kind(nn.DenseGeneral, "nn.DenseGeneral",
          lambda m, a, k, x, w: _dense_general_view(m, x, w)),
    _Kind(nn.Einsum, "nn.Einsum",
          lambda m, a, k, x, w: einsum_view(_einsum_equation(m, a, k), x, w)),
    _Kind(nn.Conv, "nn.Conv", lambda m, a, k, x, w: _conv_view("nn.Conv", m, x, w)),
    _Kind(nnx.Linear, "nnx.Linear", lambda m, a, k, x, w: _dense_view("nnx.Linear", x, w)),
    _Kind(nnx.LinearGeneral, "nnx.LinearGeneral",
          lambda m, a, k, x, w: _linear_general_view(m, x, w)),
    _Kind(nnx.Einsum, "nnx.Einsum",
          lambda m, a, k, x, w: einsum_view(_einsum_equation(m, a, k), x, w)),
    _Kind(nnx.Conv, "nnx.Conv", lambda m, a, k, x, w: _conv_view("nnx.Conv", m, x, w)),
)


def kind_of_class(module_class: type) -> Optional[_Kind]:
  """The supported kind ``module_class`` is (a subclass of), or None."""
  for kind in KINDS:
    if issubclass(module_class, kind.cls):
      return kind
  return None


def kind_of(module) -> Optional[_Kind]:
  """The supported kind ``module`` is an instance of, or None."""
  return kind_of_class(type(module))


def view_of(module, args, kwargs, kernel_shape) -> LinearView:
  """The 2-D view of one call ``module(*args, **kwargs)`` of a supported layer.

  Raises:
    UnsupportedLayer: with the reason, for configurations that have none.
  """
  kind = kind_of(module)
  if kind is None:
    raise UnsupportedLayer(f"{type(module).__name__} is not a supported linear layer")
  return kind.view(module, args, kwargs, tuple(jnp.shape(args[0])), tuple(kernel_shape))


@dataclasses.dataclass(frozen=True)
class LinearCall:
  """One intercepted call of a linear layer, at the base layer's ``__call__``.

  Attributes:
    path: the module path (tuple of keys).
    module: the module.
    kind: e.g. ``"nn.Dense"`` or ``"nnx.Conv"``.
    inputs: the array the kernel multiplies.
    view: the :class:`LinearView`, or None if unsupported.
    reason: why there is no view, else None.
  """
  path: tuple
  module: Any
  kind: str
  inputs: Any
  view: Optional[LinearView]
  reason: Optional[str]


def _linear_call(path, module, kind, args, kwargs, kernel_shape):
  try:
    view = kind.view(module, args, kwargs, tuple(jnp.shape(args[0])), tuple(kernel_shape))
    reason = None
  except UnsupportedLayer as error:
    view, reason = None, str(error)
  except InputShapeMismatch as error:
    raise InputShapeMismatch(f"{paths_lib.path_name(path)}: {error}") from None
  return LinearCall(path=tuple(path), module=module, kind=kind.name, inputs=args[0],
                    view=view, reason=reason)


def intercept_linear_calls(on_call: Callable[[LinearCall], Any]):
  """A linen ``nn.intercept_methods`` interceptor for linear-layer calls.

  ``on_call(call)`` runs at every call of a supported kind's base ``__call__``
  (so a subclass's own pre-processing has already happened), before the layer
  computes. If it returns a value other than None, that value replaces the
  layer's output (packed inference uses this).

  Usage: ``with nn.intercept_methods(intercept_linear_calls(f)): model.apply(...)``.
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    kind = kind_of(module)
    if (kind is not None and context.method_name == "__call__"
        and getattr(context.orig_method, "func", None) is kind.base_call
        and module.has_variable("params", "kernel")):
      kernel = module.get_variable("params", "kernel")
      out = on_call(_linear_call(module.path, module, kind, args, kwargs,
                                 kernel.shape))
      if out is not None:
        return out
    return next_fun(*args, **kwargs)

  return interceptor


class intercept_nnx_linear_calls:  # noqa: N801 (a context manager, used like a function)
  """Context manager: ``on_call`` runs at every NNX linear-layer call in ``model``.

  NNX has no method interception, so for the duration of the block the base
  ``__call__`` of each supported NNX kind is wrapped (and restored on exit);
  the user's classes and modules are not changed. Calls of modules outside
  ``model`` pass through untouched. See :func:`intercept_linear_calls` for
  ``on_call``.

  Args:
    model: the NNX module whose layers to intercept (paths are relative to it).
    on_call: ``(LinearCall) -> None or output``.
  """

  def __init__(self, model: nnx.Module, on_call: Callable[[LinearCall], Any]):
    self._model = model
    self._on_call = on_call
    self._saved = {}

  def __enter__(self):
    paths = {id(module): path for path, module in nnx.iter_modules(self._model)}
    for kind in KINDS:
      if not issubclass(kind.cls, nnx.Module) or kind.cls in self._saved:
        continue
      self._saved[kind.cls] = kind.cls.__call__
      self._wrap(kind, paths)
    return self

  def _wrap(self, kind, paths):
    original, on_call = kind.cls.__call__, self._on_call

    def call(module, *args, **kwargs):
      path = paths.get(id(module))
      if path is not None and kind_of(module) is kind:
        out = on_call(_linear_call(path, module, kind, args, kwargs,
                                   tuple(module.kernel.get_value().shape)))
        if out is not None:
          return out
      return original(module, *args, **kwargs)

    kind.cls.__call__ = call

  def __exit__(self, *exc):
    for cls, original in self._saved.items():
      cls.__call__ = original
    self._saved.clear()
    return False


def apply_fn_of(model_or_apply: Any) -> Callable:
  """``model.apply`` for a linen module, else the given apply function."""
  return (model_or_apply.apply if isinstance(model_or_apply, nn.Module)
          else model_or_apply)


def layer_views(model_or_apply: Any, variables, batch, **apply_kwargs) -> dict:
  """``{path: LinearView}`` of the supported linear layers, in first-call order.

  Traces one forward pass on shapes only (``jax.eval_shape``).

  Args:
    model_or_apply: a linen ``Module`` or an ``apply_fn(variables, batch,
      **apply_kwargs)``; or an ``nnx.Module`` (then ``variables`` is ignored
      and the module is called as ``model(batch, **apply_kwargs)``).
    variables: the model variables (linen).
    batch: one model input.
    **apply_kwargs: passed to the apply call (e.g. ``train=False``).

  Returns:
    A dict from ``/``-joined path (e.g. ``"block1/conv2"``) to the layer's
    2-D view at its first call.
  """
  views = {}

  def record(call):
    views.setdefault(paths_lib.path_name(call.path), call.view)

  if isinstance(model_or_apply, nnx.Module):
    graphdef, state = nnx.split(model_or_apply)

    def forward(state, x):
      model = nnx.merge(graphdef, state)
      with intercept_nnx_linear_calls(model, record):
        return model(x, **apply_kwargs)

    jax.eval_shape(forward, state, batch)
    return views
  apply_fn = apply_fn_of(model_or_apply)
  with nn.intercept_methods(intercept_linear_calls(record)):
    jax.eval_shape(lambda v, x: apply_fn(v, x, **apply_kwargs), variables, batch)
  return views


def layer_paths(model_or_apply: Any, variables, batch, **apply_kwargs) -> list:
  """``/``-joined paths of the supported linear layers, in first-call order,
  e.g. ``["conv1", "block1/conv2", "fc"]``; arguments as :func:`layer_views`."""
  return list(layer_views(model_or_apply, variables, batch, **apply_kwargs))


def kernel_mask(params: PyTree, paths) -> PyTree:
  """Bool pytree over ``params``: True on the kernel of each module in ``paths``.

  Args:
    params: the params collection of a model (a nested dict; NNX: the pure
      dict of its ``nnx.Param`` state).
    paths: ``/``-joined module paths (as in :func:`layer_paths`).
  """
  paths = set(paths)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: (paths_lib.key_of(path[-1]) == "kernel"
                       and paths_lib.path_name(path[:-1]) in paths),
      params)

