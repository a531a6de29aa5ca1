"""Weight-only quantized matrix products: one Pallas kernel for every grid.

``quantized_matmul(x, packed)`` computes ``x @ W`` for a weight ``W`` stored
as codes (:mod:`quant_core.deploy.codes`). Each kernel step reads a tile of
codes (2 to 8 bits a weight instead of 16 or 32: the bandwidth win) and
decodes it in registers/VMEM; no decoded weight is written to HBM. One
kernel skeleton serves every grid; only the decode step differs:

* uniform (:class:`~quant_core.deploy.codes.PackedUniform`):
  ``w = scale · (code - zero)``. Float activations multiply by the integer
  level ``code - zero`` (|level| <= 256, exact in bfloat16); int8 activations
  by ``code - c`` with ``c = 2^(bits-1)`` (asymmetric; fits int8) plus
  ``(c - zero) · sum_k x`` (symmetric grids use ``c = zero``: no correction).
* power of two (:class:`~quant_core.deploy.codes.PackedPow2`):
  ``w = s · 2^n2 · 2^j`` with ``s`` in {-1, 0, 1} and ``j = m - 1`` in
  ``0..2^(bits-2)-1`` (``m`` the code's magnitude field). Float activations
  multiply by ``s · 2^j``, built exactly from its bits. int8 activations use
  shift-and-add: an int8 x int8 -> int32 dot with the unit ``s · (1 << j')``,
  exponents split into bands of ``BAND_EXPONENTS = 7`` (an int8 holds
  ``2^j'`` only for ``j' <= 6``): band ``b`` holds ``7b <= j < 7b + 7`` and
  ``j' = j - 7b``. Bands: 1 for bits 2-4, 2 for 5, 3 for 6, 5 for 7, 10 for 8.

The scale (``scale``, or ``2^n2`` for power-of-two) is applied where it can
be without losing exactness:

* Per output channel or per layer (no groups): after the whole ``K`` sum.
  Float activations: the f32 sum times ``scale`` (``ldexp`` by ``n2``,
  exact, for power-of-two). int8 activations: the int32 sums are exact, then
  ``y = f32(acc) · scale`` (uniform) or ``y = sum_b ldexp(f32(limb_b),
  n2 + 7b)`` in band order (power-of-two, :func:`to_float`; one rounding for
  bits <= 4).
* Per group of ``group_size`` input rows: ``k_tile`` is a multiple of
  ``group_size`` (packing checks it), so each kernel step holds whole
  groups. Each group's partial sum (f32 for float activations, exact int32
  per band for int8) is scaled in f32 and added to an f32 accumulator, groups
  in increasing order and bands in increasing order within a group:
  ``acc <- acc + f32(P_gb) · (scale_g · 2^(7b))``.

Grouped and depthwise convolutions multiply each weight group's activations
by its own matrix: :func:`grouped_quantized_matmul` takes the groups' packed
weights stacked on a leading axis and runs them in the same kernel, whose grid
is ``(group, row block, column block[, K step])`` (a single product is the
one-group case); each program reads one group's blocks.

Float activations: products of exact weight levels, f32 accumulation on the
matrix units (``Precision.HIGHEST`` for f32), result cast to ``x.dtype``.
int8 activations: the result is float32. :func:`quantized_matmul_reference`
computes the same contract in plain jnp (identical bits for int8, f32
summation order aside for float).

int32 overflow bounds (worst case per int32 sum of ``R`` rows, ``R = K``
without groups, ``group_size`` with): uniform ``R · 128 · (128 + 256)``, so
``R <= MAX_UNIFORM_INT_K = 43690``; power-of-two ``R · 128 · 64``, so
``R <= MAX_INT_K = 2^18 - 1``. Larger ``R`` raises ValueError.

Backends:

* TPU (Mosaic): the ``K`` loop is the last ("arbitrary") grid axis and the
  output block is the accumulator. Blocks respect the TPU tiling: activation
  tiles ``(block_m, k_tile)`` with ``k_tile/2`` a multiple of 128 lanes
  (:func:`~quant_core.deploy.codes.default_k_tile`), code tiles of
  ``k_tile/2`` rows (multiple of 32 int8 sublanes), parameter blocks
  ``(1, k_tile/group_size, block_n)`` whose last two dims equal the array's
  or are lane multiples. Group-wise grids should use a ``group_size`` that is
  a multiple of 128 there, so that a group's activation slice is
  lane-aligned (only that case is lowered in the tests).
* GPU: the Triton lowering with a ``fori_loop`` over ``K`` inside each
  program (Triton programs cannot accumulate across grid steps). Triton dots
  need chunk sizes (``k_tile/2``, ``group_size``) of at least 16. This
  skeleton cannot go through Mosaic GPU, the default GPU lowering of
  ``pl.pallas_call`` in jax 0.10 (it has no ``dot_general`` there);
  :mod:`quant_core.deploy.hopper` is the Mosaic GPU kernel for sm_90
  (``plgpu.kernel``, a TMA pipeline and ``wgmma``), chosen by
  :func:`quantized_matmul` when :func:`hopper.selected` says so.
* CPU: either loop form with ``interpret=True``. Other backends use the
  reference.

Reference: A. Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017 (power-of-two weights
turn multiplications into bit shifts).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from quant_core.deploy import decode
from quant_core.deploy import hopper
from quant_core.deploy.codes import PackedPow2
from quant_core.deploy.decode import BAND_EXPONENTS  # noqa: F401 (public)
from quant_core.deploy.decode import FLOAT_DTYPES  # noqa: F401 (public)
from quant_core.deploy.decode import IntResult
from quant_core.deploy.decode import MAX_INT_K  # noqa: F401 (public)
from quant_core.deploy.decode import MAX_UNIFORM_INT_K  # noqa: F401 (public)
from quant_core.deploy.decode import num_bands  # noqa: F401 (public)
from quant_core.deploy.decode import to_float

K_LOOPS = ("grid", "fori")
PLATFORMS = ("cpu", "gpu", "tpu")

# Grid axes of the kernel: (weight group, row block, column block[, K step]).
# A single product is the one-group case, so one kernel serves both.
_K_STEP_AXIS = 3

# Elements of an activation block (rows x K step) that the interpreter's
# default grouped blocks aim for (8 MiB of f32); see default_grouped_blocks.
_INTERPRET_BLOCK_ELEMENTS = 1 << 21


# --- kernel -----------------------------------------------------------------


def _accumulate_step(plan: decode.Plan, accs, read_x, read_data, read_param,
                     zero_ref, scale_ref):
  """One ``K`` step of the kernel: the decode-and-dot of every chunk.

  Args:
    plan: the product's :class:`decode.Plan`.
    accs: accumulators, one per output band, ``(bm, bn)``.
    read_x: ``(start, size) ->`` activation columns of the step.
    read_data: ``(row, size) ->`` byte rows of the step's code tile.
    read_param: ``(ref, group) ->`` the ``(1, bn)`` parameter row of the
      step's group.
    zero_ref: zero points (asymmetric uniform grids), else None.
    scale_ref: per-group scales (group-wise grids), else None.

  Returns:
    The updated accumulators.
  """
  group_products = [None] * plan.groups_per_tile
  for chunk in range(plan.part_rows // plan.chunk_rows):
    row = chunk * plan.chunk_rows
    parts = decode.split_codes(read_data(row, plan.chunk_rows), plan.bits)
    for part, codes in enumerate(parts):
      start = part * plan.part_rows + row
      group = start // plan.group_size if plan.tile_scales else 0
      zero = read_param(zero_ref, group) if plan.has_zero else None
      products = decode.products(plan, read_x(start, plan.chunk_rows), codes, zero)
      previous = group_products[group]
      group_products[group] = products if previous is None else [
          a + b for a, b in zip(previous, products, strict=True)]
  if not plan.tile_scales:
    return [acc + p for acc, p in zip(accs, group_products[0], strict=True)]
  scales = [read_param(scale_ref, group)
            for group in range(plan.groups_per_tile)]
  return [decode.scaled_sum(accs[0], group_products, scales)]


def _split_refs(plan: decode.Plan, refs):
  """``(zero_ref, scale_ref, out_ref)`` from the kernel's trailing refs."""
  refs = list(refs)
  zero_ref = refs.pop(0) if plan.has_zero else None
  scale_ref = refs.pop(0) if plan.tile_scales else None
  (out_ref,) = refs
  return zero_ref, scale_ref, out_ref


def _readers(plan: decode.Plan, x_ref, data_ref, step):
  """Readers of ``K`` step ``step`` (0 in the grid form, where the blocks
  are the step's own)."""
  x_start, data_start = step * plan.k_tile, step * plan.part_rows
  param_step = step if plan.tile_scales else 0
  return (lambda start, size: x_ref[:, pl.ds(x_start + start, size)],
          lambda row, size: data_ref[pl.ds(data_start + row, size), :],
          lambda ref, group: ref[param_step, pl.ds(group, 1), :])


def _grid_kernel(x_ref, data_ref, *refs, plan: decode.Plan):
  """One (g, i, j, k) step; ``out_ref`` (bands, bm, bn) accumulates over k.

  The refs are the blocks of weight group ``g`` (its axis is squeezed out),
  so the body is that of a single ``(K, N)`` product.
  """
  zero_ref, scale_ref, out_ref = _split_refs(plan, refs)

  @pl.when(pl.program_id(_K_STEP_AXIS) == 0)
  def _():
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

  accs = _accumulate_step(plan, [out_ref[b] for b in range(out_ref.shape[0])],
                          *_readers(plan, x_ref, data_ref, 0), zero_ref,
                          scale_ref)
  for band, acc in enumerate(accs):
    out_ref[band] = acc


def _fori_kernel(x_ref, data_ref, *refs, plan: decode.Plan):
  """One (g, i, j) program looping over the ``K`` steps (Triton form)."""
  zero_ref, scale_ref, out_ref = _split_refs(plan, refs)

  def body(step, accs):
    return tuple(_accumulate_step(plan, list(accs),
                                  *_readers(plan, x_ref, data_ref, step),
                                  zero_ref, scale_ref))

  accs = jax.lax.fori_loop(
      0, x_ref.shape[1] // plan.k_tile, body,
      tuple(jnp.zeros(out_ref.shape[1:], out_ref.dtype)
            for _ in range(out_ref.shape[0])))
  for band, acc in enumerate(accs):
    out_ref[band] = acc


# --- wrapper ----------------------------------------------------------------


def _next_pow2(value: int) -> int:
  return 1 << max(value - 1, 0).bit_length()


def default_blocks(platform: str, m: int, n: int):
  """``(block_m, block_n)`` per backend (untuned starting points).

  GPU (Triton): powers of two >= 16 (tl.dot); small ``M`` gets narrow ``N``
  blocks so that more programs stream the weight. TPU: the full dim or a
  multiple of 128 lanes / 32 int8 sublanes. CPU interpret: large blocks,
  fewer grid steps.
  """
  if platform == "gpu":
    if m <= 64:
      return max(16, _next_pow2(m)), max(16, min(64, _next_pow2(n)))
    return 128, max(16, min(128, _next_pow2(n)))
  if platform == "tpu":
    return (m if m <= 512 else 512), (n if n <= 512 else 512)
  return min(m, 256), min(n, 256)


def default_grouped_blocks(platform: str, m: int, n: int, k_tile: int):
  """``(block_m, block_n)`` of :func:`grouped_quantized_matmul`.

  GPU and TPU: :func:`default_blocks` (the hardware tiling is that of one
  group's product). CPU interpret: the interpreter's cost grows with the
  number of grid steps far more than with block size (each step also copies
  whole operand buffers), and grouped or depthwise convolutions have many rows
  but a small ``K·N`` per group. So a block takes as many rows as fit an
  activation block of about ``2^21`` elements (all 50176 rows of a 4x112x112
  depthwise layer with ``k_tile=32``), leaving one program per group and
  column block.

  Args:
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
    m: rows of the activations.
    n: output columns per group.
    k_tile: the ``K`` step of the packed weight.

  Returns:
    ``(block_m, block_n)``.
  """
  if platform in ("gpu", "tpu"):
    return default_blocks(platform, m, n)
  return min(m, max(256, _INTERPRET_BLOCK_ELEMENTS // k_tile)), min(n, 256)


def _check_block(name: str, value) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def _compiler_params(platform: str, k_loop: str):
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=4, num_stages=3)
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    semantics = (("parallel",) * 3 + ("arbitrary",) if k_loop == "grid"
                 else ("parallel",) * 3)
    return pltpu.CompilerParams(dimension_semantics=semantics)
  return None


def _kernel_operands(plan: decode.Plan, packed, grouped: bool):
  """``(data, params)`` of the kernel, each with a leading weight-group axis:
  codes ``(groups, K_pad / parts, N)`` and the :func:`decode.kernel_parameters`
  that are read, ``(groups, steps or 1, groups per tile or 1, N)``."""
  if grouped:
    params = jax.vmap(functools.partial(decode.kernel_parameters, plan))(packed)
    data = packed.data
  else:
    params = [None if p is None else p[None]
              for p in decode.kernel_parameters(plan, packed)]
    data = packed.data[None]
  return data, [p for p in params if p is not None]


def _pallas_accumulators(x_rows, data, params, plan: decode.Plan, *, name, platform,
                         k_loop, interpret, block_m, block_n) -> jax.Array:
  """The kernel call: ``(out_bands, groups, M, N)`` accumulators.

  Args:
    x_rows: activations ``(M, groups · K_pad)``; group ``g`` holds columns
      ``g·K_pad`` to ``(g+1)·K_pad - 1``, so that each ``K`` step's block lies
      in one group (``K_pad`` is a multiple of ``k_tile``).
    data: uint8 codes ``(groups, K_pad / parts, N)``.
    params: the read parameters of :func:`_kernel_operands`.
    plan: the product's :class:`decode.Plan`.
    name: name of the kernel.
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
    k_loop: ``"grid"`` or ``"fori"``.
    interpret: run in the Pallas interpreter.
    block_m: rows per program.
    block_n: output columns per program.

  Returns:
    The accumulators of every group, row and column.
  """
  groups, code_rows, n = data.shape
  m, k_pad, k_tile = x_rows.shape[0], code_rows * plan.parts, plan.k_tile
  steps = k_pad // k_tile
  bm, bn = _check_block("block_m", block_m), _check_block("block_n", block_n)
  out_shape = jax.ShapeDtypeStruct((plan.out_bands, groups, m, n),
                                   plan.acc_dtype)
  # The group's block dim is squeezed: kernels see one group's tiles.
  out_block = (plan.out_bands, pl.squeezed, bm, bn)
  if k_loop == "grid":
    kernel = _grid_kernel
    grid = (groups, pl.cdiv(m, bm), pl.cdiv(n, bn), steps)
    param_step = (lambda s: s) if plan.tile_scales else (lambda s: 0)
    in_specs = [
        pl.BlockSpec((bm, k_tile), lambda g, i, j, s: (i, g * steps + s)),
        pl.BlockSpec((pl.squeezed, plan.part_rows, bn),
                     lambda g, i, j, s: (g, s, j))]
    in_specs += [pl.BlockSpec((pl.squeezed, 1, p.shape[2], bn),
                              lambda g, i, j, s: (g, param_step(s), 0, j))
                 for p in params]
    out_spec = pl.BlockSpec(out_block, lambda g, i, j, s: (0, g, i, j))
  else:
    kernel = _fori_kernel
    grid = (groups, pl.cdiv(m, bm), pl.cdiv(n, bn))
    in_specs = [pl.BlockSpec((bm, k_pad), lambda g, i, j: (i, g)),
                pl.BlockSpec((pl.squeezed, code_rows, bn),
                             lambda g, i, j: (g, 0, j))]
    in_specs += [pl.BlockSpec((pl.squeezed,) + p.shape[1:3] + (bn,),
                              lambda g, i, j: (g, 0, 0, j))
                 for p in params]
    out_spec = pl.BlockSpec(out_block, lambda g, i, j: (0, g, i, j))
  return pl.pallas_call(
      functools.partial(kernel, plan=plan), out_shape=out_shape, grid=grid,
      in_specs=in_specs, out_specs=out_spec, interpret=interpret,
      compiler_params=_compiler_params(platform, k_loop),
      name=name)(x_rows, data, *params)


def _check_groups(x: jax.Array, packed) -> int:
  """Checks grouped inputs, ``x (..., G, K)`` against a packed weight whose
  arrays carry a leading ``G`` axis; returns ``G``."""
  if x.ndim < 2:
    raise ValueError("x must have shape (..., groups, K) for a grouped "
                     f"product, got {x.shape}.")
  groups = x.shape[-2]
  code_rows = packed.k_padded // packed.codes_per_byte
  if packed.data.shape != (groups, code_rows, packed.n):
    raise ValueError(
        f"packed.data must be (groups, K_pad / codes per byte, N) = "
        f"({groups}, {code_rows}, {packed.n}) for x of shape {x.shape} and "
        f"a {packed.shape} weight, got {packed.data.shape}: stack the groups' "
        "packed weights along a new leading axis.")
  for leaf in jax.tree.leaves(packed):
    if leaf.ndim < 1 or leaf.shape[0] != groups:
      raise ValueError(f"every array of packed needs a leading axis of "
                       f"{groups} groups, got shape {leaf.shape}.")
  return groups


def _accumulators(x, packed, *, use_kernel: bool, grouped: bool = False,
                  block_m=None, block_n=None, platform=None, k_loop=None,
                  interpret=None):
  """Checked inputs -> ``(accumulators, plan, x as an array)``, from the
  kernel or, with ``use_kernel=False`` or an unknown platform, the
  reference.

  The accumulators are ``(out_bands, M, N)``, or ``(out_bands, groups, M,
  N)`` with ``grouped`` (``x`` then ``(..., groups, K)`` and ``packed`` the
  groups' weights stacked on a leading axis).
  """
  x = jnp.asarray(x)
  plan = decode.plan_product(x, packed)
  groups = _check_groups(x, packed) if grouped else 1
  platform = platform or jax.default_backend()
  x3 = x.reshape(-1, groups, packed.k)
  if packed.k_padded != packed.k:
    # Padded code rows multiply these zeros; activations must be finite.
    x3 = jnp.pad(x3, ((0, 0), (0, 0), (0, packed.k_padded - packed.k)))
  if not use_kernel or platform not in PLATFORMS:
    reference = functools.partial(decode.reference_accumulators, plan=plan)
    if grouped:
      out = jax.vmap(reference, in_axes=(1, 0), out_axes=1)(x3, packed)
    else:
      out = reference(x3[:, 0], packed)
    return out, plan, x
  k_loop = k_loop or ("fori" if platform == "gpu" else "grid")
  if k_loop not in K_LOOPS:
    raise ValueError(f"k_loop must be one of {K_LOOPS}, got {k_loop!r}.")
  if platform == "gpu" and k_loop != "fori":
    raise ValueError("the GPU (Triton) kernel needs k_loop='fori': Triton "
                     "programs cannot accumulate across grid steps.")
  interpret = platform == "cpu" if interpret is None else interpret
  m, n = x3.shape[0], packed.n
  default_m, default_n = (
      default_grouped_blocks(platform, m, n, plan.k_tile) if grouped else
      default_blocks(platform, m, n))
  data, params = _kernel_operands(plan, packed, grouped)
  kind = "pow2" if plan.pow2 else "uniform"
  name = f"{'grouped_' if grouped else ''}quantized_matmul_{kind}_{plan.bits}bit"
  # A free reshape: group g's K_pad columns start at column g·K_pad.
  x_rows = x3.reshape(m, groups * packed.k_padded)
  out = _pallas_accumulators(
      x_rows, data, params, plan, name=name, platform=platform,
      k_loop=k_loop, interpret=interpret,
      block_m=default_m if block_m is None else block_m,
      block_n=default_n if block_n is None else block_n)
  return (out if grouped else out[:, 0]), plan, x


def quantized_matmul(x, packed, *, block_m: Optional[int] = None,
                     block_n: Optional[int] = None,
                     platform: Optional[str] = None,
                     k_loop: Optional[str] = None,
                     interpret: Optional[bool] = None) -> jax.Array:
  """``x @ W`` for a packed weight, decoded inside one Pallas kernel.

  .. math::  y_{mn} = \\sum_g s_{gn} \\sum_{k \\in g} x_{mk}\\, l_{kn}

  with ``l`` the integer (uniform) or power-of-two level of each code and
  ``s`` its scale (one group per output channel without ``group_size``);
  the module docstring gives the exact arithmetic and rounding.

  Args:
    x: activations ``(..., K)``: bfloat16 or float32 (f32 accumulation on the
      matrix units) or int8 (exact int32 sums, scaled in f32).
    packed: a :class:`~quant_core.deploy.codes.PackedUniform` or
      :class:`~quant_core.deploy.codes.PackedPow2`, matrix view ``(K, N)``.
    block_m: rows of ``x`` per program; default :func:`default_blocks`.
    block_n: output columns per program; default :func:`default_blocks`.
      The ``K`` step is ``packed.k_tile``, fixed when packing.
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; default the backend of jax.
      Setting it lets a CPU host lower the GPU or TPU kernel.
    k_loop: ``"grid"`` (K as the last grid axis; TPU and CPU default) or
      ``"fori"`` (a loop inside each program; GPU default, and required there).
    interpret: run the kernel in the Pallas interpreter; default True on CPU.

  Returns:
    ``(..., N)`` in ``x.dtype`` for float ``x``, float32 for int8 ``x``.

  Raises:
    ValueError: on bad shapes, dtypes, block sizes or ``k_loop``, or int8
      ``x`` with more rows per int32 sum than the overflow bound allows.
  """
  if hopper.selected(x, packed, platform=platform, interpret=interpret,
                     block_m=block_m, block_n=block_n):
    return hopper.hopper_quantized_matmul(x, packed)
  out, plan, x = _accumulators(x, packed, use_kernel=True, block_m=block_m,
                               block_n=block_n, platform=platform,
                               k_loop=k_loop, interpret=interpret)
  result = decode.result_of(out, x, packed, plan)
  return to_float(result) if isinstance(result, IntResult) else result


def quantized_matmul_reference(x, packed) -> jax.Array:
  """Pure-jnp version of :func:`quantized_matmul` with the same contract.

  Decodes the whole weight with the kernel's decode functions and runs one
  dot per band (per group and band with group-wise scales); used by the
  tests and on backends without Pallas.

  Args:
    x: ``(..., K)`` bfloat16, float32 or int8.
    packed: a packed weight.

  Returns:
    As :func:`quantized_matmul`.
  """
  out, plan, x = _accumulators(x, packed, use_kernel=False)
  result = decode.result_of(out, x, packed, plan)
  return to_float(result) if isinstance(result, IntResult) else result


def _grouped_result(out: jax.Array, x: jax.Array, packed, plan: decode.Plan):
  """``(out_bands, G, M, N)`` accumulators -> ``(..., G, N)`` products, each
  group's scaled by its own parameters exactly as :func:`decode.result_of` does."""
  one_group = jax.ShapeDtypeStruct((out.shape[2], packed.k), x.dtype)

  def group_result(group_out, group_packed):
    result = decode.result_of(group_out, one_group, group_packed, plan)
    return to_float(result) if isinstance(result, IntResult) else result

  y = jax.vmap(group_result, in_axes=(1, 0), out_axes=1)(out, packed)
  return y.reshape(*x.shape[:-1], packed.n)


def grouped_quantized_matmul(x, packed, *, block_m: Optional[int] = None,
                             block_n: Optional[int] = None,
                             platform: Optional[str] = None,
                             k_loop: Optional[str] = None,
                             interpret: Optional[bool] = None) -> jax.Array:
  """Per-group ``x[..., g, :] @ W_g`` of stacked packed weights, one kernel.

  The product of grouped and depthwise convolutions (``feature_group_count``
  > 1), as one ``pallas_call`` whose leading grid axis is the group: program
  ``(g, i, j, ...)`` reads group ``g``'s activation columns, codes and
  parameters and runs the body of :func:`quantized_matmul`. With the same
  ``block_m`` and ``block_n`` the result is bit for bit that of ``jax.vmap``
  of :func:`quantized_matmul` over the groups (``in_axes=(-2, 0)``,
  ``out_axes=-2``). The default blocks (:func:`default_grouped_blocks`) take
  more rows per program on CPU, which keeps the interpreter fast when ``K·N``
  per group is small; exact sums (int8 activations) are equal with any
  blocks, while f32 sums of float activations may round differently under
  other block shapes, as for :func:`quantized_matmul` itself.

  Args:
    x: activations ``(..., G, K)``, bfloat16, float32 or int8.
    packed: a :class:`~quant_core.deploy.codes.PackedUniform` or
      :class:`~quant_core.deploy.codes.PackedPow2` of one group's ``(K, N)``
      matrix (static fields) whose arrays carry a leading axis of ``G``
      groups, e.g. ``jax.tree.map(lambda *a: jnp.stack(a), *per_group)``.
    block_m: rows of ``x`` per program; default
      :func:`default_grouped_blocks`.
    block_n: output columns per program; default
      :func:`default_grouped_blocks`.
    platform: as for :func:`quantized_matmul`.
    k_loop: as for :func:`quantized_matmul`.
    interpret: as for :func:`quantized_matmul`.

  Returns:
    ``(..., G, N)`` in ``x.dtype`` for float ``x``, float32 for int8 ``x``.

  Raises:
    ValueError: as :func:`quantized_matmul`, and when ``packed`` does not
      carry ``G`` groups.
  """
  out, plan, x = _accumulators(x, packed, use_kernel=True, grouped=True,
                               block_m=block_m, block_n=block_n,
                               platform=platform, k_loop=k_loop,
                               interpret=interpret)
  return _grouped_result(out, x, packed, plan)


def grouped_quantized_matmul_reference(x, packed) -> jax.Array:
  """Pure-jnp version of :func:`grouped_quantized_matmul`: each group as
  :func:`quantized_matmul_reference`.

  Args:
    x: ``(..., G, K)`` bfloat16, float32 or int8.
    packed: stacked packed weights, as for :func:`grouped_quantized_matmul`.

  Returns:
    As :func:`grouped_quantized_matmul`.
  """
  out, plan, x = _accumulators(x, packed, use_kernel=False, grouped=True)
  return _grouped_result(out, x, packed, plan)


def _check_shift_inputs(x, packed) -> None:
  if not isinstance(packed, PackedPow2):
    raise ValueError(f"packed must be a PackedPow2, got {type(packed)}.")
  if jnp.asarray(x).dtype == jnp.int8 and packed.group_size is not None:
    raise ValueError("shift_matmul returns exact int32 limbs, which needs "
                     "one exponent per channel or layer; use "
                     "quantized_matmul for group-wise exponents.")


def shift_matmul(x, packed: PackedPow2, *, block_m: Optional[int] = None,
                 block_n: Optional[int] = None,
                 platform: Optional[str] = None,
                 k_loop: Optional[str] = None,
                 interpret: Optional[bool] = None):
  """:func:`quantized_matmul` for a power-of-two weight, exact for int8.

  Args:
    x: ``(..., K)`` bfloat16, float32 or int8.
    packed: a :class:`~quant_core.deploy.codes.PackedPow2` (with int8 ``x``,
      ``n1`` per layer or per channel).
    block_m: as for :func:`quantized_matmul`.
    block_n: as for :func:`quantized_matmul`.
    platform: as for :func:`quantized_matmul`.
    k_loop: as for :func:`quantized_matmul`.
    interpret: as for :func:`quantized_matmul`.

  Returns:
    Float ``x``: ``(..., N)`` in ``x.dtype``. int8 ``x``: an
    :class:`IntResult` whose value is exactly ``x @ W``.

  References:
    Zhou et al., ICLR 2017, Sec. 1 and 5 (shift-based inference).
  """
  _check_shift_inputs(x, packed)
  out, plan, x = _accumulators(x, packed, use_kernel=True, block_m=block_m,
                               block_n=block_n, platform=platform,
                               k_loop=k_loop, interpret=interpret)
  return decode.result_of(out, x, packed, plan)


def shift_matmul_reference(x, packed: PackedPow2):
  """Pure-jnp version of :func:`shift_matmul` with the same contract."""
  _check_shift_inputs(x, packed)
  out, plan, x = _accumulators(x, packed, use_kernel=False)
  return decode.result_of(out, x, packed, plan)
