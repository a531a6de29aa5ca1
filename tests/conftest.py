"""Strict JAX settings for the whole suite (see tests in this folder)."""

import os
import shutil
import tempfile

import jax
import pytest

# Silent promotion is the most common quantization bug: make it an error.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Four fake CPU devices, so data-parallel code runs sharded in tests.
jax.config.update("jax_num_cpu_devices", 4)
# The suite's shapes are small: compilation, not execution, dominates its time.
jax.config.update("jax_disable_most_optimizations", True)
# Many tests build the same programs (the same solver on the same shapes, in both
# workers): a persistent compilation cache, private to this run and shared by its
# workers, compiles each once (a load from it still records a backend compilation,
# which tests/helpers.count_compilations counts).
_CACHE_ENV = "QUANT_TESTS_JAX_CACHE_DIR"
# The first process to load this file (pytest-xdist's controller, or a run without
# workers) makes the folder; the workers it starts inherit its name.
_OWNS_CACHE = _CACHE_ENV not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="quant-tests-jax-cache-")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session):
  """The process that made the cache folder removes it."""
  del session
  if _OWNS_CACHE:
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops each module's compiled programs when it ends.

  The suite compiles thousands of small programs; kept for the whole session in one
  process they pile up until XLA's CPU compiler crashed late in the run.
  """
  yield
  jax.clear_caches()
