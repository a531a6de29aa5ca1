"""inq_jax: Incremental Network Quantization (Zhou et al., ICLR 2017) in JAX."""

from inq_jax.inq import INQ
from inq_jax.inq import INQState
from inq_jax.inq import codebook_fraction
from inq_jax.inq import inq
from inq_jax.optim import MaskFrozenUpdatesState
from inq_jax.optim import inq_optimizer
from inq_jax.optim import mask_frozen_updates
from inq_jax.partition import STRATEGIES
from inq_jax.partition import default_quantizable
from inq_jax.partition import partition
from inq_jax.partition import quantizable_mask
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
