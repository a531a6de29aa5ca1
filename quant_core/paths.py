"""Key paths as names: the one helper that turns a path into a ``/``-joined string.

A path is either a pytree key path (``jax.tree_util`` entries such as ``DictKey``
and ``SequenceKey``) or a module path (a tuple of plain keys, as Flax gives it);
both name a leaf or a module as ``"block1/conv2/kernel"``.
"""

from typing import Any, Sequence


def key_of(entry) -> Any:
  """The plain key of one path entry: a dict key, a sequence index, an attribute
  name, or the entry itself when it is already plain."""
  for field in ("key", "idx", "name"):
    if hasattr(entry, field):
      return getattr(entry, field)
  return entry


def keys_of(path: Sequence[Any]) -> tuple:
  """The plain keys of a key path (or of a module path, unchanged)."""
  return tuple(key_of(entry) for entry in path)


def path_name(path: Sequence[Any]) -> str:
  """A path as a ``/``-joined string, e.g. ``"params/Conv_0/kernel"``."""
  return "/".join(str(key) for key in keys_of(path))


def get(tree, path: Sequence[Any]):
  """The node of a nested dict (or list) at ``path``."""
  for key in keys_of(path):
    tree = tree[key]
  return tree
