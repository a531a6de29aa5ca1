"""An NNX module with other parameter values, the module itself untouched.

Post-training methods, packed inference and the experiments all see an NNX model's
weights as a pure dict (``nnx.to_pure_dict`` of its ``nnx.Param`` state), the layout of
a linen model's ``params``, and need the module back with another such dict.
"""

from flax import nnx
import jax


class NNXParams:
  """An ``nnx.Module`` split once into its ``nnx.Param`` state and the rest.

  Attributes:
    graphdef: the module's graph definition.
    params: its parameters as a pure dict (arrays under the module's attribute
      names and list indices).
  """

  def __init__(self, model: nnx.Module):
    self.graphdef, state, self._rest = nnx.split(model, nnx.Param, ...)
    # A copy of the state's containers: the user's module keeps its own.
    self._param_state = jax.tree.map(lambda leaf: leaf, state)
    self.params = nnx.to_pure_dict(self._param_state)

  def with_params(self, params, rest=None) -> nnx.Module:
    """A new module like the split one, with ``params`` (a pure dict of the same
    structure; its leaves may be arrays, tracers or packed layers) as its parameters,
    and ``rest`` (a pure dict like :attr:`rest`) as its other state when given."""
    state = jax.tree.map(lambda leaf: leaf, self._param_state)
    nnx.replace_by_pure_dict(state, params)
    other = self._rest
    if rest is not None:
      other = jax.tree.map(lambda leaf: leaf, self._rest)
      nnx.replace_by_pure_dict(other, rest)
    return nnx.merge(self.graphdef, state, other)

  @property
  def rest(self):
    """The module's other state (buffers, batch statistics, RNG state) as a pure dict."""
    return nnx.to_pure_dict(self._rest)
