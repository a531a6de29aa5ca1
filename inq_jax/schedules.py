"""Accumulated-portion schedules of INQ.

The portion ``sigma_n`` is the share of each layer's weights that is frozen to
powers of two after INQ step ``n``. Reference: Zhou et al., ICLR 2017, Sec. 3
(ResNet-18 rows of the bit-width experiment, Table 3).
"""

from typing import Sequence, Tuple

import numpy as np

from quant_core import pow2

# Paper schedules for ResNet-18 at each bit width.
SCHEDULES = {
    5: (0.5, 0.75, 0.875, 1.0),
    4: (0.3, 0.5, 0.8, 0.9, 0.95, 1.0),
    3: (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
    2: (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1.0),
}


def validate_schedule(portions: Sequence[float]) -> Tuple[float, ...]:
  """Checks a schedule of accumulated portions and returns it as a tuple.

  Args:
    portions: accumulated portions, e.g. ``(0.5, 0.75, 0.875, 1.0)``.

  Returns:
    The portions as a tuple of Python floats.

  Raises:
    ValueError: unless the portions are non-empty, strictly increasing, lie in
      (0, 1] and end at 1.
  """
  values = tuple(float(p) for p in portions)
  if not values:
    raise ValueError("A schedule needs at least one portion; it must end at 1.")
  if not all(np.isfinite(values)) or values[0] <= 0.0 or values[-1] > 1.0:
    raise ValueError(f"Schedule portions must lie in (0, 1], got {values}.")
  if any(b <= a for a, b in zip(values, values[1:], strict=False)):
    raise ValueError(f"Schedule portions must be strictly increasing, "
                     f"got {values}.")
  if values[-1] != 1.0:
    raise ValueError(f"A schedule must end at 1.0, got {values}.")
  return values


def get_schedule(bits: int) -> Tuple[float, ...]:
  """The paper's ResNet-18 schedule for ``bits`` (2..5)."""
  bits = pow2.check_bits(bits)
  if bits not in SCHEDULES:
    raise ValueError(f"The paper gives schedules for bits {sorted(SCHEDULES)}, "
                     f"not {bits}; pass a custom schedule instead.")
  return SCHEDULES[bits]
