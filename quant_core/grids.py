"""Quantization grids shared by COMQ and its round-to-nearest baseline.

Reference: A. Zhang et al., "COMQ: A Backpropagation-Free Algorithm for
Post-Training Quantization", arXiv 2403.07134 (2024), and the official code
(AozhongZhang/COMQ, ``quant.py``) for the asymmetric min-max grid.

Every grid here is, per output channel ``j``, a sorted table of ``L`` values

.. math::

  G_j = \\{ u_{j,t} \\cdot \\delta_j + m_j : t = 0, \\dots, L-1 \\}

with ``u`` the *level units* (fixed while COMQ runs), ``δ`` the step (the only
thing a scale update changes) and ``m`` an offset, zero except for
``grid="offset"``. Internally weights are in channel-major
("torch") layout ``(d_out, d_in)``: row ``j`` is output channel ``j``.
"""

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from quant_core import pow2

GRIDS = ("asymmetric", "symmetric", "pow2", "signed", "offset")
GRANULARITIES = ("channel", "group", "layer")
# Storage dtypes a uniform grid's scales can be held to (``scale_dtype``).
SCALE_DTYPES = ("float16",)


class Grid(NamedTuple):
  """Per-channel (or per-group) quantization grid, values ``units * step[:, None]``
  (plus ``offset[:, None]`` for ``grid="offset"``).

  Its rows are the output channels, or with ``granularity="group"`` the
  ``(channel, group)`` pairs (``d_out * groups`` rows, see :func:`make_grid`);
  the shapes below say ``d_out`` for either.

  Attributes:
    units: ``(d_out, L)`` sorted level units (they already include ``scalar``).
    step: ``(d_out,)`` multiplier of the units.
    unit_scale: ``(d_out,)`` units per integer code step (``scalar`` for the
      uniform grids, 1 for pow2 and for constant channels), so the reported
      scale is ``step * unit_scale``.
    zero_point: ``(d_out,)`` int32 code of the level nearest to ``0 - min``:
      uniform grids decode as ``scale * (code - zero_point)``; for pow2,
      ``code - zero_point`` is the signed magnitude index. Zeros for
      ``"offset"``, where it has no meaning (the values are ``step * code +
      offset``).
    exponent: ``(d_out,)`` int32, for pow2 the INQ ``n1`` of each channel
      (``step = 2^n1``); zeros for the uniform grids.
    offset: ``(d_out,)`` the smallest value of an ``"offset"`` grid, None for
      every other grid.
  """
  units: jax.Array
  step: jax.Array
  unit_scale: jax.Array
  zero_point: jax.Array
  exponent: jax.Array
  offset: Optional[jax.Array] = None

  def values(self) -> jax.Array:
    """``(d_out, L)`` grid values: ``units * step``, then ``+ offset`` if set.

    With an offset the product is rounded before the sum, so every value is
    float32 ``step * t + offset`` as a GGUF Q4_1 dequantizer computes it.
    """
    scaled = self.units * self.step[:, None]
    if self.offset is None:
      return scaled
    # XLA contracts a product and a sum into one fused multiply-add (one
    # rounding, not two) even across an optimization barrier; a select between
    # them, which no simplification can remove (only a NaN step makes a NaN
    # product), keeps the two roundings.
    step = jnp.broadcast_to(self.step[:, None], scaled.shape)
    return jnp.where(jnp.isnan(scaled), step, scaled) + self.offset[:, None]


def check_options(*, bits, grid, granularity, scalar, group_size=None,
                  scale_dtype=None) -> None:
  """Raises ValueError on a bad bit width, mode string, ``scalar``, group size or
  ``scale_dtype``."""
  pow2.check_bits(bits)
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")
  if granularity not in GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if not isinstance(scalar, (int, float)) or not 0.0 < scalar <= 1.0:
    raise ValueError(f"scalar must be a number in (0, 1], got {scalar!r}.")
  if grid == "pow2" and scalar != 1.0:
    raise ValueError(
        "grid='pow2' needs scalar=1.0: a shrink factor would move the levels "
        f"off the powers of two, got scalar={scalar!r}.")
  if grid == "offset" and scalar != 1.0:
    raise ValueError(
        "grid='offset' needs scalar=1.0: its levels are min + step * t, with no "
        f"shrink factor, got scalar={scalar!r}.")
  if granularity == "group":
    if (isinstance(group_size, (bool, np.bool_))
        or not isinstance(group_size, (int, np.integer)) or group_size < 1):
      raise ValueError("granularity='group' needs group_size, an integer >= 1 "
                       f"(inputs per scale), got {group_size!r}.")
  elif group_size is not None:
    raise ValueError(f"group_size={group_size!r} is only for granularity='group', "
                     f"not {granularity!r}.")
  if scale_dtype is not None:
    if scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be None or one of {SCALE_DTYPES}, got "
                       f"{scale_dtype!r}.")
    if grid == "pow2" or scalar != 1.0:
      raise ValueError(
          f"scale_dtype={scale_dtype!r} is for the uniform grids with scalar=1.0 (their "
          f"weights are then scale * (code - zero_point) exactly), got grid={grid!r}, "
          f"scalar={scalar!r}.")


def num_groups(d_in: int, group_size) -> int:
  """Groups along ``d_in``: ``ceil(d_in / group_size)``, 1 without groups."""
  return 1 if group_size is None else -(-d_in // group_size)


def group_rows(wt, group_size):
  """``(d_out, d_in)`` as ``(d_out * groups, group_size)``: one row per group.

  A ragged last group (``group_size`` not dividing ``d_in``) is padded with
  copies of its last weight, which leaves its min, max and max-abs unchanged.
  """
  d_out, d_in = wt.shape
  pad = num_groups(d_in, group_size) * group_size - d_in
  if pad:
    wt = jnp.pad(wt, ((0, 0), (0, pad)), mode="edge")
  return wt.reshape(-1, group_size)


def lookup(table, codes, group_size=None):
  """Per-weight entries of a grid table: ``table[row of (j, i), codes[j, i]]``.

  Args:
    table: ``(d_out * groups, L)``, one row per channel, or per ``(channel,
      group)`` with ``group_size`` inputs per group (the last may be shorter).
    codes: ``(d_out, d_in)`` int indices into the rows.
    group_size: inputs per group, or None for one row per channel.

  Returns:
    ``(d_out, d_in)``.
  """
  if group_size is None:
    return jnp.take_along_axis(table, codes, axis=1)
  d_out, d_in = codes.shape
  groups = num_groups(d_in, group_size)
  padded = jnp.pad(codes, ((0, 0), (0, groups * group_size - d_in)))
  out = jnp.take_along_axis(table.reshape(d_out, groups, -1),
                            padded.reshape(d_out, groups, group_size), axis=2)
  return out.reshape(d_out, groups * group_size)[:, :d_in]


def round_to_grid(values, wt, group_size=None):
  """Nearest grid value of every weight: ``(codes, rounded)``, both ``wt``-shaped.

  ``values`` has one row per channel, or per ``(channel, group)`` of
  ``group_size`` inputs (see :func:`make_grid`).
  """
  if group_size is None:
    return nearest(values, wt)
  d_out, d_in = wt.shape
  codes, rounded = nearest(values, group_rows(wt, group_size))
  crop = lambda a: a.reshape(d_out, -1)[:, :d_in]
  return crop(codes), crop(rounded)


def _reduce(wt, fn, granularity):
  """Per-row reduction, or one value broadcast to all rows for 'layer'."""
  per_row = fn(wt, axis=1)
  if granularity == "layer":
    return jnp.broadcast_to(fn(per_row), per_row.shape)
  return per_row


def representable_step(step, scale_dtype, *, round_up: bool = True):
  """``step`` moved onto the values of ``scale_dtype`` (e.g. float16), in its dtype.

  With ``round_up`` the smallest such value ``>= step`` (a grid built on it still
  spans the weights' range), else the nearest. None leaves ``step`` unchanged.
  """
  if scale_dtype is None:
    return step
  narrow = step.astype(scale_dtype)
  if round_up:
    narrow = jnp.where(narrow.astype(step.dtype) < step,
                       jnp.nextafter(narrow, jnp.asarray(jnp.inf, narrow.dtype)), narrow)
  return narrow.astype(step.dtype)


def _round_down(value, scale_dtype):
  """The largest value of ``scale_dtype`` ``<= value``, in ``value``'s dtype (None:
  ``value``)."""
  if scale_dtype is None:
    return value
  narrow = value.astype(scale_dtype)
  narrow = jnp.where(narrow.astype(value.dtype) > value,
                     jnp.nextafter(narrow, jnp.asarray(-jnp.inf, narrow.dtype)), narrow)
  return narrow.astype(value.dtype)


def _signed_extreme(wt, granularity):
  """Per row the weight of largest magnitude, sign kept; the first one (in
  row-major order for ``"layer"``) among equal magnitudes."""
  flat = wt.reshape(1, -1) if granularity == "layer" else wt
  first = jnp.argmax(jnp.abs(flat), axis=1)
  extreme = jnp.take_along_axis(flat, first[:, None], axis=1)[:, 0]
  return jnp.broadcast_to(extreme, wt.shape[:1])


def make_grid(wt, *, bits: int, grid: str = "asymmetric",
              granularity: str = "channel", scalar: float = 1.0,
              group_size=None, scale_dtype=None) -> Grid:
  """Builds the grid of each output channel from the weights.

  * ``"asymmetric"`` (official COMQ): ``δ = (max - min) / (2^b - 1)``,
    ``z = round_half_even(min / δ)``, units ``scalar * (z + t)`` for
    ``t = 0..2^b-1``. ``δ`` is the true IEEE quotient in ``wt``'s dtype, also
    under ``jit``/``vmap`` (where XLA would otherwise multiply by a rounded
    reciprocal), so ``δ``, ``z`` and the values ``(scalar * (z + t)) * δ``
    are bit-identical to the official float32 code. A constant channel
    ``c`` (``δ = 0``) gets ``δ = |c|`` (or 1 when ``c = 0``) with unit
    ``sign(c) + t``, so ``c`` is on the grid exactly.
  * ``"symmetric"``: ``δ = max|w| / (2^(b-1) - 1)`` (the same exact
    division), units ``scalar * t`` for ``t = -(2^(b-1)-1)..2^(b-1)-1``
    (``2^b - 1`` levels, zero included; 2 bits is ternary). An all-zero
    channel gets ``δ = 1``.
  * ``"signed"`` (llama.cpp's Q4_0 rule): ``2^b`` consecutive integers times
    ``δ = |e| / 2^(b-1)`` (the same exact division), ``e`` the weight of
    largest magnitude, sign kept (the first of equal magnitudes, in index
    order, as llama.cpp's ``quantize_row_q4_0_ref``). Units ``scalar * t``
    with ``t = -2^(b-1)..2^(b-1)-1`` (zero point ``2^(b-1)``) when ``e < 0``,
    ``t = -(2^(b-1)-1)..2^(b-1)`` (zero point ``2^(b-1)-1``) when ``e > 0``,
    so with ``scalar = 1`` ``e`` itself is a level. An all-zero channel gets
    ``δ = 1`` and the ``e < 0`` layout.
  * ``"offset"`` (llama.cpp's Q4_1 rule): values ``m + δ t`` for ``t =
    0..2^b-1``, with ``m = min`` a free float (not a multiple of ``δ``) and
    ``δ = (max - m) / (2^b - 1)``; units ``t``, unit scale 1, ``offset = m``
    and zero point 0 (meaningless here: the smallest level ``values[:, 0]``
    is ``m`` exactly). Each value is the float32 ``δ t``, then ``+ m`` (two
    roundings, no fused multiply-add). A constant channel ``c`` gets ``δ =
    |c|`` (1 when ``c = 0``) and ``m = c``. Needs ``scalar = 1``.
  * ``"pow2"``: the INQ level set ``{0, ±2^n2, ..., ±2^n1}`` with
    ``n1 = floor(log2(4 max|w| / 3))`` (:func:`quant_core.pow2.pow2_exponents`),
    i.e. units ``{0, ±2^-k : k = 0..2^(b-2)-1}`` and step ``2^n1``; values
    can be packed with :func:`quant_core.pow2.pow2_encode` using
    ``exponent`` as ``n1`` (per channel, or per layer).

  With ``scale_dtype="float16"`` (uniform grids, ``scalar=1``) the step is
  rounded up to the next float16 value before the zero point is taken, so
  every grid value is ``scale * (code - zero_point)`` exactly (one float32
  product of a float16 scale and a small integer), as a checkpoint that
  stores float16 scales holds it (:mod:`quant_core.deploy.export_gptq`); a
  constant channel is then on the grid only if ``|c|`` is a float16 value.
  For ``"offset"`` the min is first rounded down to a float16 value ``m``
  (the grid still reaches the smallest weight), then ``δ = (max - m) / (2^b
  - 1)`` is rounded up to one (the top level ``m + δ (2^b - 1)``, up to its
  own float32 rounding, reaches the largest weight); a constant channel is on
  its grid when ``max > m`` too, since then ``δ`` comes from ``max - m``.

  With ``granularity="layer"`` the statistics are taken over the whole
  matrix and broadcast to every channel. With ``granularity="group"`` each
  channel has one grid per ``group_size`` consecutive inputs: the grid rows
  are ``(channel, group)`` pairs, row ``j * groups + k`` for inputs
  ``k * group_size ...``; a last group of fewer inputs takes the rest.

  Args:
    wt: ``(d_out, d_in)`` weights, channel-major.
    bits: bit width in 2..8.
    grid: one of :data:`GRIDS`.
    granularity: ``"channel"``, ``"group"`` or ``"layer"``.
    scalar: the official ``--scalar`` shrink factor λ in (0, 1].
    group_size: inputs per grid with ``granularity="group"``.
    scale_dtype: None, or ``"float16"``: steps held to float16 values.

  Returns:
    A :class:`Grid` with one row per channel, or ``d_out * groups`` rows.
  """
  check_options(bits=bits, grid=grid, granularity=granularity, scalar=scalar,
                group_size=group_size, scale_dtype=scale_dtype)
  if granularity == "group":
    return make_grid(group_rows(wt, group_size), bits=bits, grid=grid,
                     granularity="channel", scalar=scalar, scale_dtype=scale_dtype)
  dtype = wt.dtype
  d_out = wt.shape[0]

  def divisor(n, skip):
    # XLA rewrites x / c, for c a constant or a broadcast (as vmap makes of
    # an unbatched c), into x * (1 / c): often 1 ulp off the official
    # float32 step, which flips round(min / step) at half-integers and
    # shifts the grid. A divisor that depends on the data and sits behind a
    # barrier keeps a true IEEE division. It is 1 where ``skip``: those
    # quotients are replaced anyway.
    return jax.lax.optimization_barrier(
        jnp.where(skip, jnp.ones((), dtype), jnp.full((), n, dtype)))

  exponent = jnp.zeros((d_out,), jnp.int32)
  offset = None
  if grid == "asymmetric":
    hi = _reduce(wt, jnp.max, granularity)
    lo = _reduce(wt, jnp.min, granularity)
    constant = hi == lo
    step = jnp.where(constant, jnp.abs(lo),
                     (hi - lo) / divisor(2**bits - 1, constant))
    step = representable_step(jnp.where(step == 0, jnp.ones_like(step), step),
                              scale_dtype)
    zero = jnp.round(lo / step)
    t = jnp.arange(2**bits, dtype=dtype)[None, :]
    lam = jnp.where(constant, jnp.ones_like(step), jnp.full_like(step, scalar))
    units = lam[:, None] * (zero[:, None] + t)
    zero_point = (-zero).astype(jnp.int32)
  elif grid == "symmetric":
    half = 2 ** (bits - 1) - 1
    amax = _reduce(jnp.abs(wt), jnp.max, granularity)
    step = amax / divisor(half, amax == 0)
    step = representable_step(jnp.where(step == 0, jnp.ones_like(step), step),
                              scale_dtype)
    t = jnp.arange(-half, half + 1, dtype=dtype)[None, :]
    lam = jnp.full_like(step, scalar)
    units = jnp.broadcast_to(scalar * t, (d_out, 2 * half + 1))
    zero_point = jnp.full((d_out,), half, jnp.int32)
  elif grid == "signed":
    half = 2 ** (bits - 1)
    extreme = _signed_extreme(wt, granularity)
    amax = jnp.abs(extreme)
    step = amax / divisor(half, amax == 0)
    step = representable_step(jnp.where(step == 0, jnp.ones_like(step), step),
                              scale_dtype)
    # A positive extreme is the top level; a negative (or zero) one the bottom.
    zero_point = jnp.where(extreme > 0, half - 1, half).astype(jnp.int32)
    t = jnp.arange(2**bits, dtype=jnp.int32)[None, :] - zero_point[:, None]
    lam = jnp.full_like(step, scalar)
    units = scalar * t.astype(dtype)
  elif grid == "offset":
    hi = _reduce(wt, jnp.max, granularity)
    offset = _round_down(_reduce(wt, jnp.min, granularity), scale_dtype)
    constant = hi == offset
    step = jnp.where(constant, jnp.abs(offset),
                     (hi - offset) / divisor(2**bits - 1, constant))
    step = representable_step(jnp.where(step == 0, jnp.ones_like(step), step),
                              scale_dtype)
    units = jnp.broadcast_to(jnp.arange(2**bits, dtype=dtype)[None, :], (d_out, 2**bits))
    lam = jnp.ones_like(step)
    zero_point = jnp.zeros((d_out,), jnp.int32)
  else:
    n_mag = pow2.num_magnitudes(bits)
    exponent, _ = pow2.pow2_exponents(
        _reduce(jnp.abs(wt), jnp.max, granularity), bits)
    # The zero-channel sentinel exponent gives step 0: every level is 0.
    step = jnp.ldexp(jnp.ones((d_out,), dtype), exponent)
    mags = np.ldexp(1.0, -np.arange(n_mag))
    table = np.concatenate([-mags, [0.0], mags[::-1]]).astype(dtype)
    units = jnp.broadcast_to(jnp.asarray(table)[None, :], (d_out, table.size))
    lam = jnp.ones_like(step)
    zero_point = jnp.full((d_out,), n_mag, jnp.int32)
  return Grid(units=units, step=step, unit_scale=lam, zero_point=zero_point,
              exponent=exponent, offset=offset)


def nearest(values, target):
  """Index and value of the grid point nearest to ``target``, per row.

  Ties go to the lower grid value (the first index reaching the minimum, as
  the official ``argmin``), since ``values`` rows are sorted ascending.

  Args:
    values: ``(d_out, L)`` grid values.
    target: ``(d_out,)`` or ``(d_out, k)`` targets.

  Returns:
    ``(index, value)`` of the shape of ``target``.
  """
  squeeze = target.ndim == 1
  t = target[:, :, None] if not squeeze else target[:, None, None]
  dist = jnp.abs(values[:, None, :] - t)
  index = jnp.argmin(dist, axis=-1).astype(jnp.int32)
  value = jnp.take_along_axis(values, index, axis=1)
  if squeeze:
    return index[:, 0], value[:, 0]
  return index, value


# Bytes of the grid parameters of one channel (or layer) stored beside the codes:
# float32 scale and zero point (asymmetric; signed, packed as asymmetric), float32
# scale (symmetric), int32 exponent n1 (pow2), float32 step and min (offset).
_PARAMETER_BYTES = {"asymmetric": 8, "symmetric": 4, "pow2": 4, "signed": 8,
                    "offset": 8}


def num_levels(bits: int, grid: str) -> int:
  """Number of values of a ``bits``-bit ``grid`` (see :func:`make_grid`)."""
  check_options(bits=bits, grid=grid, granularity="channel", scalar=1.0)
  if grid in ("asymmetric", "signed", "offset"):
    return 2**bits
  if grid == "symmetric":
    return 2**bits - 1
  return 2 ** (bits - 1) + 1


def parameter_bytes(grid: str, num_grids: int) -> int:
  """Bytes of the scales (and zero points or exponents) of ``num_grids`` grids."""
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")
  return _PARAMETER_BYTES[grid] * num_grids


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weights", "codes", "levels", "scale", "zero_point", "exponent",
                 "error", "history"],
    meta_fields=["group_size", "bits", "grid"])
@dataclasses.dataclass(frozen=True)
class LayerQuantization:
  """A matrix quantized onto a grid: what every ``comq_jax`` solver returns
  (``solver.quantize_layer``), its codes and grid as the solver produced them.

  Layouts follow Flax: weight-shaped arrays are ``(d_in, d_out)`` and
  per-channel arrays have length ``d_out``. With group-wise grids
  (``group_size`` set) the per-channel arrays gain a group axis: ``(d_out,
  groups)``, and ``levels`` is ``(d_out, groups, L)``; input ``i`` belongs
  to group ``i // group_size`` (the last group may be shorter).

  A pytree: the arrays are its leaves, and the grid's layout (``group_size``,
  ``bits``, ``grid``) is static metadata, so a result can leave ``jax.jit``
  whole and packs without its settings repeated
  (:func:`quant_core.deploy.pack_layer_quantization`).

  Attributes:
    weights: de-quantized weights, shape and dtype of ``w``;
      ``weights[i, j] == levels[j, codes[i, j]]`` (``levels[j, i //
      group_size, codes[i, j]]`` with groups).
    codes: int32 index of each weight into its grid's sorted ``levels``.
    levels: ``(d_out, L)`` grid values of each channel, in ``w``'s dtype.
    scale: ``(d_out,)`` value of one integer code step. Uniform grids decode
      as ``scale * (codes - zero_point)`` (to 1 ulp), ``"offset"`` as
      ``scale * codes + levels[..., 0]`` (the min, exactly; see
      :func:`make_grid`); for pow2 this is ``2^n1``.
    zero_point: ``(d_out,)`` int32 code of zero (``-z`` of the official grid);
      zeros, without meaning, for ``"offset"``.
    exponent: ``(d_out,)`` int32 INQ ``n1`` per channel for ``grid="pow2"``
      (pack with :func:`quant_core.pow2.pow2_encode`), zeros otherwise.
    error: ``||X W - X weights||_F`` from the Gram, or None without data.
    history: errors after each sweep and, with ``scale_update``, after each
      scale update (``iters`` or ``2 * iters`` entries); empty for RTN.
    group_size: inputs per grid, or None for per-channel and per-layer grids.
    bits: the bit width the weights were quantized to.
    grid: the grid kind, one of :data:`GRIDS`.
  """
  weights: jax.Array
  codes: jax.Array
  levels: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  exponent: jax.Array
  error: Optional[jax.Array]
  history: jax.Array
  group_size: Optional[int]
  bits: int
  grid: str
