"""Input checks shared by the libraries.

Value checks (finiteness, ranges) only run on concrete arrays: under an outer
``jax.jit`` the values are unknown, and the checks are skipped there.
"""

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import paths


def is_concrete(x) -> bool:
  """True when ``x`` holds values now (not a tracer inside a transform)."""
  return not isinstance(x, jax.core.Tracer)


def check_floating(x, name: str) -> None:
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(
        f"{name} must have a floating dtype, got {jnp.asarray(x).dtype}.")


def check_finite(x, name: str) -> None:
  """Raises ValueError naming ``name`` if concrete ``x`` has NaN or inf."""
  if is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(f"{name} contains NaN or inf values.")


def check_portion(portion) -> None:
  """Raises ValueError unless a concrete ``portion`` lies in (0, 1]."""
  if not is_concrete(portion):
    return
  value = np.asarray(portion)
  if value.shape != () or not 0.0 < float(value) <= 1.0:
    raise ValueError(
        f"portion must be a scalar in (0, 1], got {portion!r}.")


def check_same_structure(reference, other, reference_name: str,
                         other_name: str) -> None:
  """Raises ValueError unless ``other`` has the tree and leaf shapes of
  ``reference``."""
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
  other_leaves, other_def = jax.tree_util.tree_flatten_with_path(other)
  if ref_def != other_def:
    raise ValueError(
        f"{other_name} does not match the structure of {reference_name}: "
        f"expected {ref_def}, got {other_def}.")
  for (path, ref_leaf), (_, other_leaf) in zip(ref_leaves, other_leaves, strict=True):
    if jnp.shape(ref_leaf) != jnp.shape(other_leaf):
      raise ValueError(
          f"{other_name} leaf {paths.path_name(path)} has shape "
          f"{jnp.shape(other_leaf)}, expected {jnp.shape(ref_leaf)}.")
