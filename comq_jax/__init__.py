"""COMQ post-training quantization in JAX (Zhang et al., arXiv 2403.07134)."""

from comq_jax.grid import Grid, make_grid
from comq_jax.layer import (GramAccumulator, LayerQuantization,
                            accumulate_gram, quantize_layer, round_to_nearest)
from comq_jax.model import LayerReport, layer_paths, quantize_model
