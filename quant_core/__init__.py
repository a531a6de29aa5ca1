"""quant_core: the ground floor that INQ, the PTQ solvers and deployment share.

* :mod:`quant_core.layers`: which modules are quantizable linear layers (linen
  and NNX, found by interception) and their 2-D views;
* :mod:`quant_core.capture`: the Gram of every layer's inputs (conv and
  depthwise Grams, row masks, microbatches, meshes);
* :mod:`quant_core.grids`: uniform (asymmetric, symmetric, and GGUF's signed
  and offset) and power-of-two grids per channel, group or layer, with one bits
  check, and the :class:`LayerQuantization` a solver returns;
* :mod:`quant_core.pow2`: the power-of-two codebook (INQ Eqs. 1-4);
* :mod:`quant_core.paths`: key paths as ``/``-joined names;
* :mod:`quant_core.nnx_params`: an NNX module with other parameter values;
* :mod:`quant_core.deploy`: packed codes, the Pallas kernel family, packed
  inference and the packed file (loaded on first use: no Pallas on import).

Neither :mod:`inq_jax` nor :mod:`comq_jax` imports the other; both import this.
"""

from quant_core import deploy
from quant_core import nnx_params
from quant_core.capture import GramAccumulator
from quant_core.capture import accumulate_gram
from quant_core.capture import layer_grams
from quant_core.grids import Grid
from quant_core.grids import LayerQuantization
from quant_core.grids import make_grid
from quant_core.layers import Predicate
from quant_core.layers import UnsupportedLayer
from quant_core.layers import default_quantizable
from quant_core.layers import layer_paths
from quant_core.layers import layer_views
from quant_core.layers import quantizable_mask
from quant_core.paths import path_name

__all__ = [
    "GramAccumulator",
    "Grid",
    "LayerQuantization",
    "Predicate",
    "UnsupportedLayer",
    "accumulate_gram",
    "default_quantizable",
    "deploy",
    "layer_grams",
    "layer_paths",
    "layer_views",
    "make_grid",
    "nnx_params",
    "path_name",
    "quantizable_mask",
]
