"""Utilities shared by the tests."""

import contextlib
import pathlib

import jax
import numpy as np

# Golden data travel with the repository (provenance in data/README.md).
REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "data"

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def reference_file(name: str) -> pathlib.Path:
  """Path of a golden reference file in ``tests/data``.

  Args:
    name: file name, e.g. ``"inq_pow2_cases.npz"``.

  Returns:
    The file's path.

  Raises:
    FileNotFoundError: the file is missing. Golden tests must fail, never
      skip, without their data.
  """
  path = REFERENCE_DIR / name
  if not path.is_file():
    raise FileNotFoundError(f"golden reference data {path} is missing")
  return path


@contextlib.contextmanager
def count_compilations():
  """Counts XLA backend compilations inside the block: ``with ... as n:``
  then ``n[0]``."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _COMPILE_EVENT:
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def assert_trees_bitwise_equal(got, expected):
  """Same tree, same dtypes and shapes, the same bits in every leaf."""
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()
