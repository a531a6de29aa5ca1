"""inq_jax: Incremental Network Quantization (Zhou et al., ICLR 2017) in JAX.

Packed storage, the Pallas shift-matmul kernel and packed inference live in
:mod:`inq_jax.deploy`, imported on first use.
"""

from inq_jax import deploy
from inq_jax.compensation import Compensation
from inq_jax.compensation import LayerStatistics
from inq_jax.incremental import INQ
from inq_jax.incremental import INQState
from inq_jax.incremental import codebook_fraction
from inq_jax.incremental import inq
from inq_jax.layers import Predicate
from inq_jax.layers import default_quantizable
from inq_jax.layers import layer_paths
from inq_jax.layers import layer_views
from inq_jax.layers import quantizable_mask
from inq_jax.optim import inq_optimizer
from inq_jax.optim import mask_frozen_updates
from inq_jax.partitioning import STRATEGIES
from inq_jax.partitioning import partition
from inq_jax.pow2 import MAX_BITS
from inq_jax.pow2 import MIN_BITS
from inq_jax.pow2 import ZERO_LAYER_N1
from inq_jax.pow2 import in_codebook
from inq_jax.pow2 import pow2_decode
from inq_jax.pow2 import pow2_encode
from inq_jax.pow2 import pow2_exponents
from inq_jax.pow2 import pow2_quantize
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
    "Predicate",
    "SCHEDULES",
    "STRATEGIES",
    "ZERO_LAYER_N1",
    "codebook_fraction",
    "default_quantizable",
    "deploy",
    "get_schedule",
    "in_codebook",
    "inq",
    "inq_optimizer",
    "layer_paths",
    "layer_views",
    "mask_frozen_updates",
    "partition",
    "pow2_decode",
    "pow2_encode",
    "pow2_exponents",
    "pow2_quantize",
    "quantizable_mask",
    "validate_schedule",
]
