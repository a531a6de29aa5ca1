"""Strict JAX settings for the whole suite (see tests in this folder)."""

import jax
import pytest

# Silent promotion is the most common quantization bug: make it an error.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Four fake CPU devices, so data-parallel code runs sharded in tests.
jax.config.update("jax_num_cpu_devices", 4)
# The suite's shapes are small: compilation, not execution, dominates its time.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops each module's compiled programs when it ends.

  The suite compiles thousands of small programs; kept for the whole session in one
  process they pile up until XLA's CPU compiler crashed late in the run.
  """
  yield
  jax.clear_caches()
