"""Packed inference through any method of an NNX module, not only its ``__call__``.

:func:`~quant_core.deploy.inference.packed_apply` calls an NNX module as
``model(*args)``. Decoders have other entry points, such as
``forward_with_cache(tokens, cache)`` for cached decoding; :func:`packed_method_apply`
runs one of those with every packed kernel through ``quantized_matmul``, and
:func:`jit_packed_method` is its jitted, cached form (one compilation per input
shape, so a decode loop compiles its prefill and its one-token step once each).

The interception of :mod:`quant_core.layers` wraps the linear layer classes for the
duration of the call, so it reaches the layers whichever method of the model calls
them. The method runs on a one-attribute wrapper module whose ``__call__`` forwards to
it: packed_apply's checks (parameter paths and shapes, each layer's packed view) and
its error messages apply unchanged; layer paths in messages carry the wrapper's
``model/`` prefix.

A linen module needs none of this: ``packed_apply(module, variables, *args,
method=...)`` passes ``method`` to ``module.apply``.
"""

import functools
from typing import Any, Callable, Optional

from flax import nnx
import jax

from quant_core.deploy import inference

PyTree = Any


class _MethodCall(nnx.Module):
  """Calls ``model.<method>`` as its ``__call__`` (the parameters under ``model``)."""

  def __init__(self, model: nnx.Module, method: str):
    self.model = model
    self.method = method

  def __call__(self, *args, **kwargs):
    return getattr(self.model, self.method)(*args, **kwargs)


def _check_method(model, method: str) -> None:
  if not isinstance(model, nnx.Module):
    raise ValueError(f"packed methods run NNX modules, got {type(model).__name__}; a linen "
                     "module takes packed_apply(module, variables, *args, method=...).")
  if not callable(getattr(model, method, None)):
    raise ValueError(f"{type(model).__name__} has no method {method!r}.")


def _wrapped_variables(packed_variables: PyTree) -> PyTree:
  """``packed_variables`` with its params under the wrapper's ``model`` attribute."""
  if not isinstance(packed_variables, dict) or "params" not in packed_variables:
    raise ValueError("packed_variables must be a dict with a 'params' collection (from "
                     "pack_quantization, pack_layers or load_packed), got "
                     f"{type(packed_variables).__name__}.")
  return dict(packed_variables, params={"model": packed_variables["params"]})


def packed_method_apply(model: nnx.Module, packed_variables: PyTree, method: str, *args,
                        block_m: Optional[int] = None, block_n: Optional[int] = None,
                        interpret: Optional[bool] = None, **kwargs):
  """``model.<method>(*args, **kwargs)`` with every packed kernel run by ``quantized_matmul``.

  Args:
    model: an NNX module; a copy of it with ``packed_variables["params"]`` as its
      ``nnx.Param`` state is called, ``model`` is not changed.
    packed_variables: from :func:`~quant_core.deploy.pack_quantization`,
      :func:`~quant_core.deploy.pack_layers` or
      :func:`~quant_core.deploy.files.load_packed` (``{"params": ...}``, the module's
      parameter tree with packed kernels).
    method: the name of the method to call, e.g. ``"forward_with_cache"``.
    *args: the method's positional arguments.
    block_m: optional kernel block override, as for
      :func:`~quant_core.deploy.packed_apply`.
    block_n: optional kernel block override.
    interpret: optional interpret-mode override.
    **kwargs: the method's keyword arguments.

  Returns:
    What the method returns.

  Raises:
    ValueError: for a module that is not NNX, an unknown method, packed variables that
      do not hold the module's parameters, or a packed layer that does not fit its
      layer (as :func:`~quant_core.deploy.packed_apply`).
  """
  _check_method(model, method)
  return inference.packed_apply(_MethodCall(model, method), _wrapped_variables(packed_variables),
                                *args, block_m=block_m, block_n=block_n, interpret=interpret,
                                **kwargs)


@functools.lru_cache(maxsize=None)
def _jitted(graphdef, method: str, options: tuple) -> Callable:
  def call(state, packed_variables, *args):
    return packed_method_apply(nnx.merge(graphdef, state), packed_variables, method, *args,
                               **dict(options))

  return jax.jit(call)


def jit_packed_method(model: nnx.Module, method: str, *, block_m: Optional[int] = None,
                      block_n: Optional[int] = None,
                      interpret: Optional[bool] = None) -> Callable:
  """The jitted :func:`packed_method_apply` of ``model.<method>``, cached.

  One jitted function per (graph definition, method, options) is kept, so calls with
  the same input shapes compile once, even across calls of this function with models
  of one structure (the cache holds no module or array). The module's state is read
  at every call, as it is then.

  Args:
    model: an NNX module.
    method: the name of the method to call.
    block_m: as :func:`packed_method_apply`.
    block_n: as :func:`packed_method_apply`.
    interpret: as :func:`packed_method_apply`.

  Returns:
    ``fn(packed_variables, *args)``, returning what the method returns; its arguments
    are traced (pytrees of arrays), so keyword and static arguments are not taken.

  Raises:
    ValueError: for a module that is not NNX or an unknown method.
  """
  _check_method(model, method)
  options = tuple(sorted(dict(block_m=block_m, block_n=block_n,
                              interpret=interpret).items()))
  graphdef, _ = nnx.split(model)
  jitted = _jitted(graphdef, method, options)
  return lambda packed_variables, *args: jitted(nnx.state(model), packed_variables, *args)
