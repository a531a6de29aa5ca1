"""W4A16 on Hopper: a Mosaic GPU kernel that decodes uniform codes in registers and
multiplies them on the warpgroup matrix units (``wgmma``).

:func:`hopper_quantized_matmul` computes ``x @ W`` for bfloat16 activations and a
:class:`~quant_core.deploy.codes.PackedUniform` weight, with the same contract as
:func:`~quant_core.deploy.kernels.quantized_matmul` (float activations). It is the
sm_90 alternative to the Triton kernel and reads the same packed layout, so one
packed tree serves both.

One program (a CUDA block of one warpgroup) owns a ``(block_m, block_n)`` output
tile and walks ``K`` in steps of ``k_tile`` with a TMA pipeline of
``max_concurrent_steps`` stages (``plgpu.emit_pipeline``). Per step:

1. TMA brings the step's activation part tiles ``(block_m, k_tile/parts)``
   (bfloat16, swizzled for ``wgmma``), its code tile ``(k_tile/parts,
   block_n)`` (uint8) and its scale (and zero-point) rows into shared memory.
2. The warpgroup loads the codes into registers in the ``wgmma`` fragment
   layout, splits nibbles (``bits <= 4``: low nibbles are the step's first
   half of rows, high nibbles the second, as in
   :mod:`quant_core.deploy.codes`), and forms the integer levels ``code -
   zero``; ``|level| <= 256`` is exact in bfloat16. The levels go to a swizzled
   shared-memory tile that ``wgmma`` reads as its right operand (``wgmma``
   takes only its left operand from registers, and that operand would have to
   be ``W^T``: the layout stores ``W``).
3. ``wgmma`` accumulates each group's partial sum ``P_g = x_g @ level_g`` in
   f32; then ``acc <- acc + P_g · scale_g`` (scale broadcast over rows). A
   per-channel scale is applied the same way at every step.

Arithmetic against :func:`~quant_core.deploy.kernels.quantized_matmul`: the
same exact levels and f32 accumulation; per-channel scales multiply each
step's partial sum instead of the whole sum, so results agree to f32 rounding
(a few ulp per step), not bitwise.

Scope (:func:`unsupported_reason` says why a product is outside it, and
:func:`~quant_core.deploy.kernels.quantized_matmul` then keeps the Triton
kernel): uniform grids of 2 to 8 bits, bfloat16 activations, ``N`` a multiple
of ``block_n``, and per-channel scales or groups of ``k_tile/parts`` or
``k_tile`` rows (g128 with the GPU default ``k_tile = 128``). Rows of ``x`` are
padded to a multiple of ``block_m`` (``wgmma`` tiles have 64 rows), so at
``M <= 16`` most of the matrix-unit work is padding; the memory traffic, which
bounds small-``M`` products, is not.

Status: written against jax 0.10's ``jax.experimental.pallas.mosaic_gpu`` with
warpgroup lowering semantics. The tests lower it for a CUDA target on CPU and
run it in the Mosaic GPU interpreter against the reference; it is timed only
by ``benchmarks/gpu_check.py`` on a GPU, and is preferred on sm_90 only once
that check has shown it faster (:data:`PREFERRED_ON_SM90`).

Reference: the Hopper ``wgmma`` instruction is described in the PTX ISA,
"Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions".
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from quant_core.deploy import codes as packed_codes

# The GPU check has not yet timed this kernel against Triton on an sm_90
# device; until its committed results show it faster, Triton stays the
# default there.
PREFERRED_ON_SM90 = False

# wgmma tiles have 64 rows per warpgroup.
WGMMA_ROWS = 64
DEFAULT_BLOCK_N = 64
DEFAULT_STAGES = 4


def unsupported_reason(x, packed, *, block_m: int = WGMMA_ROWS,
                       block_n: int = DEFAULT_BLOCK_N) -> Optional[str]:
  """Why :func:`hopper_quantized_matmul` cannot run this product, or None.

  Args:
    x: the activations (an array or ``jax.ShapeDtypeStruct``).
    packed: the packed weight.
    block_m: rows per program.
    block_n: output columns per program.

  Returns:
    None when the kernel applies, else a sentence naming what is outside its
    scope.
  """
  if not isinstance(packed, packed_codes.PackedUniform):
    return f"the Hopper kernel reads uniform grids, got {type(packed).__name__}"
  if jnp.dtype(x.dtype) != jnp.bfloat16:
    return f"the Hopper kernel takes bfloat16 activations, got {jnp.dtype(x.dtype)}"
  if block_m % WGMMA_ROWS or block_m <= 0:
    return f"block_m must be a positive multiple of {WGMMA_ROWS}, got {block_m}"
  if block_n % 8 or not 8 <= block_n <= 256:
    return f"block_n must be a multiple of 8 in [8, 256], got {block_n}"
  if packed.n % block_n:
    return f"N = {packed.n} is not a multiple of block_n = {block_n}"
  part_rows = packed.k_tile // packed.codes_per_byte
  if part_rows % 16:
    return f"k_tile / codes per byte = {part_rows} is not a multiple of 16"
  group = packed.group_size
  if group is not None and group not in (part_rows, packed.k_tile):
    return (f"group_size {group} is neither k_tile/codes per byte = {part_rows}"
            f" nor k_tile = {packed.k_tile}")
  return None


def selected(x, packed, *, platform: Optional[str], interpret: Optional[bool],
             block_m: Optional[int], block_n: Optional[int]) -> bool:
  """Whether :func:`~quant_core.deploy.kernels.quantized_matmul` runs this
  kernel instead of Triton: on an sm_90 device, compiled, with default blocks,
  inside the kernel's scope, and only while :data:`PREFERRED_ON_SM90`."""
  if not PREFERRED_ON_SM90 or interpret or block_m or block_n:
    return False
  if (platform or jax.default_backend()) != "gpu":
    return False
  capability = str(getattr(jax.devices()[0], "compute_capability", ""))
  return capability.startswith("9") and unsupported_reason(x, packed) is None


def _swizzled(dtype, minor: int, operand: str):
  """Tiling and swizzle transforms of a shared-memory tile with ``minor``
  elements per row, as ``wgmma`` and TMA want them."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits, operand)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)),
          plgpu.SwizzleTransform(swizzle))


def _interpret_params():
  """The Mosaic GPU interpreter's parameters (a private jax module)."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise RuntimeError(
        "interpret=True needs the Mosaic GPU interpreter "
        "(jax._src.pallas.mosaic_gpu.interpret), which this jax lacks") from err
  return params.InterpretGPUParams()


def _param_rows(param: jax.Array, packed) -> jax.Array:
  """Scale or zero point as ``(rows, N)``: one row per group, padded to whole
  kernel steps, or one row for per-channel parameters."""
  if param.ndim == 1:
    return param.reshape(1, -1)
  rows = packed.k_padded // packed.group_size
  return jnp.pad(param, ((0, rows - param.shape[0]), (0, 0)))


def hopper_quantized_matmul(x, packed: packed_codes.PackedUniform, *,
                            block_m: int = WGMMA_ROWS,
                            block_n: int = DEFAULT_BLOCK_N,
                            max_concurrent_steps: int = DEFAULT_STAGES,
                            interpret: bool = False) -> jax.Array:
  """``x @ W`` for bfloat16 ``x`` and a uniform packed ``W`` on Hopper.

  .. math::  y_{mn} = \\sum_g s_{gn} \\sum_{k \\in g} x_{mk}\\,(c_{kn} - z_{gn})

  Args:
    x: bfloat16 activations ``(..., K)``.
    packed: a :class:`~quant_core.deploy.codes.PackedUniform`, matrix view
      ``(K, N)``, inside the scope of :func:`unsupported_reason`.
    block_m: rows per program, a multiple of 64.
    block_n: output columns per program, a multiple of 8 up to 256 dividing
      ``N``.
    max_concurrent_steps: TMA pipeline stages in flight.
    interpret: run in the Mosaic GPU interpreter (CPU); the compiled kernel
      needs an sm_90 GPU.

  Returns:
    ``(..., N)`` bfloat16.

  Raises:
    ValueError: on a product outside the kernel's scope, or a ``K`` that
      differs from the weight's.
  """
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  reason = unsupported_reason(x, packed, block_m=block_m, block_n=block_n)
  if reason is not None:
    raise ValueError(reason)
  if x.shape[-1] != packed.k:
    raise ValueError(f"x has {x.shape[-1]} input features, the weight expects "
                     f"{packed.k}")
  if max_concurrent_steps < 1:
    raise ValueError(f"max_concurrent_steps must be >= 1, got {max_concurrent_steps}")

  batch_shape = x.shape[:-1]
  rows = x.reshape(-1, packed.k)
  m = rows.shape[0]
  m_pad = -(-max(m, 1) // block_m) * block_m
  rows = jnp.pad(rows, ((0, m_pad - m), (0, packed.k_padded - packed.k)))

  parts = packed.codes_per_byte
  part_rows = packed.k_tile // parts
  grouped = packed.group_size is not None
  # Parameter rows one kernel step reads, and the row of each part's group.
  step_param_rows = packed.k_tile // packed.group_size if grouped else 1
  part_param_row = [(p * part_rows) // packed.group_size if grouped else 0
                    for p in range(parts)]
  groups = sorted(set(part_param_row))
  scale = _param_rows(packed.scale.astype(jnp.float32), packed)
  zero = None if packed.symmetric else _param_rows(
      packed.zero_point.astype(jnp.int32), packed)
  k_steps = packed.k_padded // packed.k_tile
  x_transforms = _swizzled(jnp.bfloat16, part_rows, "lhs")
  level_transforms = _swizzled(jnp.bfloat16, block_n, "rhs")
  out_transforms = _swizzled(jnp.bfloat16, block_n, "out")
  if interpret:
    # The interpreter has no layout hints; the compiled kernel needs them.
    load = lambda ref, index, layout: ref[index]
  else:
    load = lambda ref, index, layout: plgpu.load(ref, index, layout=layout)
  row_layout = plgpu.Layout.WGMMA
  column_layout = plgpu.Layout.WGMMA.reduce(0)

  def kernel(x_gmem, data_gmem, scale_gmem, *rest, level_smem, out_smem):
    zero_gmem = rest[0] if zero is not None else None
    out_gmem = rest[-1]
    n_block = pl.ds(lax.axis_index("n") * block_n, block_n)
    m_block = pl.ds(lax.axis_index("m") * block_m, block_m)

    def step(_, *refs):
      x_parts, data_smem, scale_smem = refs[:parts], refs[parts], refs[parts + 1]
      zero_smem = refs[parts + 2] if zero is not None else None
      acc = refs[-1]
      data = load(data_smem, (), row_layout).astype(jnp.int32)
      codes = [data & 0xF, data >> 4] if parts == 2 else [data]
      for part, part_codes in enumerate(codes):
        if zero_smem is None:
          level = part_codes - packed.symmetric_zero_point
        else:
          zero_row = load(zero_smem, part_param_row[part], column_layout)
          level = part_codes - lax.broadcast_in_dim(
              zero_row, (part_rows, block_n), (1,))
        level_smem[part] = level.astype(jnp.float32).astype(jnp.bfloat16)
      plgpu.commit_smem()
      for group in groups:
        def group_product(partial_ref, group=group):
          for part in range(parts):
            if part_param_row[part] == group:
              plgpu.wgmma(partial_ref, x_parts[part], level_smem.at[part])
          plgpu.wgmma_wait(0)
          return partial_ref[...]
        partial = pl.run_scoped(group_product,
                                plgpu.ACC((block_m, block_n), jnp.float32))
        scale_row = load(scale_smem, group, column_layout)
        acc = acc + partial * lax.broadcast_in_dim(
            scale_row, (block_m, block_n), (1,))
      return acc

    in_specs = [plgpu.BlockSpec((block_m, part_rows),
                                functools.partial(lambda p, k: (0, parts * k + p), p),
                                transforms=x_transforms)
                for p in range(parts)]
    param_spec = plgpu.BlockSpec(
        (step_param_rows, block_n), (lambda k: (k, 0)) if grouped else (lambda k: (0, 0)))
    in_specs += [plgpu.BlockSpec((part_rows, block_n), lambda k: (k, 0)), param_spec]
    operands = [x_gmem.at[m_block]] * parts + [
        data_gmem.at[:, n_block], scale_gmem.at[:, n_block]]
    if zero is not None:
      in_specs.append(param_spec)
      operands.append(zero_gmem.at[:, n_block])

    acc = plgpu.emit_pipeline(
        step, grid=(k_steps,), in_specs=in_specs,
        max_concurrent_steps=max_concurrent_steps,
        init_carry=jnp.zeros((block_m, block_n), jnp.float32))(*operands)
    out_smem[...] = acc.astype(jnp.bfloat16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[m_block, n_block])
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m_pad, packed.n), jnp.bfloat16),
      grid=(packed.n // block_n, m_pad // block_m), grid_names=("n", "m"),
      scratch_types=dict(
          level_smem=plgpu.SMEM((parts, part_rows, block_n), jnp.bfloat16,
                                transforms=level_transforms),
          out_smem=plgpu.SMEM((block_m, block_n), jnp.bfloat16,
                              transforms=out_transforms)),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_params() if interpret else False)
  args = (rows, packed.data, scale) + ((zero,) if zero is not None else ())
  out = call(*args)
  return out[:m].reshape(*batch_shape, packed.n)
