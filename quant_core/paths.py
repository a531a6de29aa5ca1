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


def child(tree, key):
  """``tree[key]``, where a ``/``-joined name's ``"0"`` also finds the integer key ``0``
  (NNX lists of layers give integer keys in their state dicts)."""
  if isinstance(key, str) and key.isdigit() and not isinstance(tree, (list, tuple)) and (
      key not in tree):
    return tree[int(key)]
  if isinstance(tree, (list, tuple)):
    return tree[int(key)]
  return tree[key]


def get(tree, path: Sequence[Any]):
  """The node of a nested dict (or list) at ``path``; see :func:`child` for the keys."""
  for key in keys_of(path):
    tree = child(tree, key)
  return tree
