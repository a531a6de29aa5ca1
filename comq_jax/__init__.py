"""COMQ post-training quantization in JAX (Zhang et al., arXiv 2403.07134), with
GPTQ and round-to-nearest on the same Grams and grids.

* :mod:`comq_jax.solvers`: :func:`comq`, :func:`gptq` and :func:`rtn` build
  immutable solvers that carry their settings; ``solver.quantize_layer(w, x)``;
* :mod:`comq_jax.rules`: which solver quantizes which layer (mixed precision,
  layers kept in float);
* :mod:`comq_jax.driver`: :func:`quantize_model`, a whole Flax model (linen or
  NNX) with any solver;
* :mod:`comq_jax.layer`, :mod:`comq_jax.baselines`: the COMQ coordinate-descent
  core, and the round-to-nearest and GPTQ cores;
* :mod:`comq_jax.objective`: the layer objective from Grams;
* :mod:`comq_jax.magnitude_reduction`: MagR preprocessing (the solvers'
  ``preprocess="magr"``);
* :mod:`comq_jax.bit_allocation`: mixed precision, one bit width per layer under
  a budget of average bits per weight.

Layer discovery, the Gram capture, the grids, packing and the kernels live in
:mod:`quant_core`.
"""

from comq_jax.bit_allocation import Allocation
from comq_jax.bit_allocation import allocate_bits
from comq_jax.blockwise import plan_blocks
from comq_jax.driver import quantize_model
from comq_jax.magnitude_reduction import magr
from comq_jax.objective import reconstruction_error
from comq_jax.results import LayerReport
from comq_jax.results import ModelQuantization
from comq_jax.results import SkippedLayer
from comq_jax.results import Timings
from comq_jax.solvers import COMQ
from comq_jax.solvers import GPTQ
from comq_jax.solvers import RTN
from comq_jax.solvers import Solver
from comq_jax.solvers import comq
from comq_jax.solvers import gptq
from comq_jax.solvers import rtn

__all__ = [
    "Allocation",
    "COMQ",
    "GPTQ",
    "LayerReport",
    "ModelQuantization",
    "RTN",
    "SkippedLayer",
    "Solver",
    "Timings",
    "allocate_bits",
    "comq",
    "gptq",
    "magr",
    "plan_blocks",
    "quantize_model",
    "reconstruction_error",
    "rtn",
]
