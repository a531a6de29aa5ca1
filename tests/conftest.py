"""Strict JAX settings for the whole suite (see tests in this folder)."""

import jax

# Silent promotion is the most common quantization bug: make it an error.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Four fake CPU devices, so data-parallel code runs sharded in tests.
jax.config.update("jax_num_cpu_devices", 4)
# The suite's shapes are small: compilation, not execution, dominates its time.
jax.config.update("jax_disable_most_optimizations", True)
