"""COMQ post-training quantization in JAX (Zhang et al., arXiv 2403.07134).

* :mod:`comq_jax.grid`: the uniform and power-of-two grids;
* :mod:`comq_jax.objective`: the layer objective from Grams, and the result type;
* :mod:`comq_jax.layer`: the COMQ coordinate-descent solver;
* :mod:`comq_jax.baselines`: round-to-nearest and GPTQ on the same grids;
* :mod:`comq_jax.model`: whole-model quantization with any of them.
"""

from comq_jax.baselines import gptq_layer
from comq_jax.baselines import round_to_nearest
from comq_jax.grid import Grid
from comq_jax.grid import make_grid
from comq_jax.layer import quantize_layer
from comq_jax.model import LayerReport
from comq_jax.model import ModelQuantization
from comq_jax.model import SkippedLayer
from comq_jax.model import Timings
from comq_jax.model import layer_grams
from comq_jax.model import quantize_model
from comq_jax.objective import GramAccumulator
from comq_jax.objective import LayerQuantization
from comq_jax.objective import accumulate_gram
from comq_jax.objective import reconstruction_error

__all__ = [
    "GramAccumulator",
    "Grid",
    "LayerQuantization",
    "LayerReport",
    "ModelQuantization",
    "SkippedLayer",
    "Timings",
    "accumulate_gram",
    "gptq_layer",
    "layer_grams",
    "make_grid",
    "quantize_layer",
    "quantize_model",
    "reconstruction_error",
    "round_to_nearest",
]
