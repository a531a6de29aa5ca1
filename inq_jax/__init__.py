"""inq_jax: Incremental Network Quantization (Zhou et al., ICLR 2017) in JAX.

The INQ algorithm: the power-of-two rule (Eqs. 1-4, from :mod:`quant_core.pow2`),
the partition, the incremental step, the optax freeze transform, the schedules,
the data-aware compensation, and packing a quantized model
(:func:`pack_model`). Layer discovery, Grams, grids, kernels and packed inference
live in :mod:`quant_core`.
"""

from inq_jax.compensation import Compensation
from inq_jax.compensation import LayerStatistics
from inq_jax.compensation import layer_statistics
from inq_jax.incremental import INQ
from inq_jax.incremental import INQState
from inq_jax.incremental import codebook_fraction
from inq_jax.incremental import inq
from inq_jax.optim import inq_optimizer
from inq_jax.packing import pack_model
from inq_jax.optim import mask_frozen_updates
from inq_jax.partitioning import STRATEGIES
from inq_jax.partitioning import partition
from quant_core.pow2 import MAX_BITS
from quant_core.pow2 import MIN_BITS
from quant_core.pow2 import ZERO_LAYER_N1
from quant_core.pow2 import in_codebook
from quant_core.pow2 import pow2_decode
from quant_core.pow2 import pow2_encode
from quant_core.pow2 import pow2_exponents
from quant_core.pow2 import pow2_quantize
from inq_jax.schedules import SCHEDULES
from inq_jax.schedules import get_schedule
from inq_jax.schedules import validate_schedule

__all__ = [
    "Compensation",
    "INQ",
    "INQState",
    "LayerStatistics",
    "MAX_BITS",
    "MIN_BITS",
    "SCHEDULES",
    "STRATEGIES",
    "ZERO_LAYER_N1",
    "codebook_fraction",
    "get_schedule",
    "in_codebook",
    "inq",
    "inq_optimizer",
    "layer_statistics",
    "mask_frozen_updates",
    "pack_model",
    "partition",
    "pow2_decode",
    "pow2_encode",
    "pow2_exponents",
    "pow2_quantize",
    "validate_schedule",
]
