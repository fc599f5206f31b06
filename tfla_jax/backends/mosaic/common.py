"""Helpers shared by the Mosaic GPU kernels: SMEM tiles, the matmul-accumulate, layouts.

The Mosaic GPU interpreter (CPU testing) rejects two things the hardware path relies on: a
register-held wgmma A operand and accumulating into `ACC.init(x)`. `mma` hides the difference:
on hardware it accumulates in place; interpreted it multiplies into a fresh accumulator (the A
operand staged through SMEM) and adds in registers. Everything else is the same code.
"""

import jax.numpy as jnp
from jax import lax
from jax._src.state import types as state_types
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32
LOG2E = 1.4426950408889634
# Chunk states between kernels: bf16 for bf16 and fp16 inputs (fp16 would overflow on large
# states; the tensor cores take 16-bit operands only, and the products accumulate in float32).
STATE_DTYPE = jnp.dtype(jnp.bfloat16)
ROWS = plgpu.Layout.WGMMA.reduce(1)   # a vector over the rows of a WGMMA-layout tile
COLS = plgpu.Layout.WGMMA.reduce(0)   # a vector over its columns


def smem(shape, dtype):
    """An SMEM scratch tile (leading dims are buffers); a 16-bit matrix gets the tiling and the
    widest swizzle its minor dim allows (what TMA and wgmma want)."""
    if len(shape) < 2 or jnp.dtype(dtype).itemsize != 2:
        return plgpu.SMEM(shape, dtype)
    swizzle = plgpu.find_swizzle(shape[-1] * 16)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // 2)),
                                                plgpu.SwizzleTransform(swizzle)))


def _is_ref(x):
    return isinstance(x, state_types.TransformedRef) or isinstance(getattr(x, "aval", None),
                                                                   state_types.AbstractRef)


def mma(acc, a, b, *, interpret, scratch=None):
    """acc + a @ b: acc a float32 WGMMA-layout register tile; a an SMEM ref or a 16-bit register
    tile (then `scratch`, an SMEM ref of a's shape, is used when interpreted); b an SMEM ref."""
    if interpret:
        if not _is_ref(a):
            scratch[...] = a
            plgpu.commit_smem()
            a = scratch

        def product(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, F32))

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def row_vector(ref):
    """A float32 SMEM vector as a register vector over the rows of a WGMMA tile."""
    return plgpu.load(ref, layout=ROWS)


def rows_times(w, x):
    """w[:, None] * x for a row vector w and a WGMMA tile x."""
    return lax.broadcast_in_dim(w, x.shape, [0]) * x


def tile_frame(r0, shape):
    """For a (rows, cols) WGMMA tile whose first row is r0 in the chunk: the row positions and
    the column iota (int32 tiles), and broadcasts of a row / column vector to the tile."""
    r_pos = r0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    c_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    return (r_pos, c_iota, lambda x: lax.broadcast_in_dim(x, shape, [0]),
            lambda x: lax.broadcast_in_dim(x, shape, [1]))


def observe_releases(free, n_steps, slots):
    """A producer's wait for the releases of its last `slots` ring steps (of n_steps, slot
    j % slots): every phase of a barrier is waited for (the interpreter checks it)."""
    lo = max(n_steps, slots) if isinstance(n_steps, int) else jnp.maximum(n_steps, slots)

    @pl.loop(lo, n_steps + slots)
    def _(j):
        plgpu.barrier_wait(free.at[lax.rem(j, slots)])


def interpret_params(interpret: bool):
    return plgpu.InterpretGPUParams() if interpret else None
