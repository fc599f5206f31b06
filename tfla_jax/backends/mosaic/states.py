"""The chunk-state recurrence on Mosaic GPU, one kernel for both directions.

forward  (a, b, w) = (k, v, w_state):   X_{c+1} = decay_c X_c + (w a_c)^T b_c,   X_0 = C_0
reverse  (a, b, w) = (q, dh, w_inter inv_n):  X_c = decay_c X_{c+1} + (w a_c)^T b_c,  X_NC = dC_T
One CTA (one warpgroup) owns one (block_k x block_v) tile of X for one (b, h) and runs over
the chunks; the float32 tile stays in registers, the a / b rows stream through a TMA pipeline in
sub-blocks of `block_t` rows, and every boundary state goes out in bf16 (STATE_DTYPE).
The row weight w is applied in registers on the way from the TMA tile to the wgmma operand.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tfla_jax.backends.triton.common import idiv, irem  # x64-safe int division
from tfla_jax.backends.mosaic.common import (COLS, F32, STATE_DTYPE, interpret_params, mma,
                                             row_vector, rows_times, smem)


def _recurrence_kernel(a_ref, b_ref, w_ref, w2_ref, decay_ref, x0_ref, y0_ref, states_ref,
                       vec_ref, last_ref, *, reverse, chunk_size, block_t, block_k, block_v, H,
                       max_steps, interpret):
    # a_ref (B, T, H, K), b_ref (B, T, H, V), w_ref, w2_ref (B, H, T), decay_ref (B, H, NC),
    # x0_ref (B, H, K, V), y0_ref (B, H, K) f32; out states_ref (B, H, NC+1, K, V) bf16,
    # vec_ref (B, H, NC+1, K) f32 (written by the first V tile), last_ref (B, H, K, V) f32.
    kt, vt, z = lax.axis_index("k"), lax.axis_index("v"), lax.axis_index("bh")
    b, h = idiv(z, H), irem(z, H)
    T = a_ref.shape[1]
    NC = T // chunk_size
    n_sub = chunk_size // block_t
    ks, vs = pl.ds(kt * block_k, block_k), pl.ds(vt * block_v, block_v)
    tile_shape = (block_k, block_v)

    def with_f32_tile(fn):
        return pl.run_scoped(lambda buf, bar: fn(buf, bar),
                             plgpu.SMEM(tile_shape, F32), plgpu.Barrier(num_barriers=1))

    def load_x0(buf, bar):
        plgpu.copy_gmem_to_smem(x0_ref.at[b, h, ks, vs], buf, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        return plgpu.load(buf, layout=plgpu.Layout.WGMMA)

    x = with_f32_tile(load_x0)

    def main(decay_smem, aw_smem, out_smem, y_smem, bar):
        plgpu.copy_gmem_to_smem(decay_ref.at[b, h], decay_smem, bar.at[0])
        plgpu.copy_gmem_to_smem(y0_ref.at[b, h, ks], y_smem, bar.at[1])
        plgpu.barrier_wait(bar.at[0])
        plgpu.barrier_wait(bar.at[1])
        y = plgpu.load(y_smem, layout=COLS)

        def store(idx, x, y):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the staging tiles are free again
            out_smem[...] = x.astype(out_smem.dtype)
            y_smem[...] = y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, states_ref.at[b, h, idx, ks, vs])

            @pl.when(vt == 0)
            def _():
                plgpu.copy_smem_to_gmem(y_smem, vec_ref.at[b, h, idx, ks])

        def step(indices, a_smem, b_smem, w_smem, w2_smem, carry):
            x, y = carry
            j = indices[0]
            chunk = idiv(j, n_sub)
            if reverse:
                chunk = NC - 1 - chunk
            first = irem(j, n_sub) == 0

            @pl.when(first)
            def _():
                store(chunk + 1 if reverse else chunk, x, y)

            d = jnp.where(first, decay_smem[chunk], 1.0)
            a = plgpu.load(a_smem, layout=plgpu.Layout.WGMMA).astype(F32)
            aw_smem[...] = rows_times(row_vector(w_smem), a).astype(aw_smem.dtype)
            plgpu.commit_smem()
            y = y * d + rows_times(row_vector(w2_smem), a).sum(axis=0)
            return mma(x * d, aw_smem.transpose((1, 0)), b_smem, interpret=interpret), y

        def rows(j):
            if reverse:  # the sub-blocks of chunk NC-1-c in order
                c, r = idiv(j, n_sub), irem(j, n_sub)
                return (NC - 1 - c) * n_sub + r
            return j

        pipeline = plgpu.emit_pipeline(
            step,
            grid=(NC * n_sub,),
            in_specs=[
                plgpu.BlockSpec((block_t, block_k), lambda j: (rows(j), 0)),
                plgpu.BlockSpec((block_t, block_v), lambda j: (rows(j), 0)),
                plgpu.BlockSpec((block_t,), lambda j: (rows(j),)),
                plgpu.BlockSpec((block_t,), lambda j: (rows(j),)),
            ],
            max_concurrent_steps=min(max_steps, NC * n_sub),
            init_carry=(x, y),
        )
        x_end, y_end = pipeline(a_ref.at[b, :, h, ks], b_ref.at[b, :, h, vs], w_ref.at[b, h],
                                w2_ref.at[b, h])
        store(0 if reverse else NC, x_end, y_end)
        plgpu.wait_smem_to_gmem(0)
        return x_end

    x = pl.run_scoped(main, plgpu.SMEM(decay_ref.shape[-1:], F32),
                      smem((block_t, block_k), a_ref.dtype), smem(tile_shape, STATE_DTYPE),
                      plgpu.SMEM((block_k,), F32), plgpu.Barrier(num_barriers=2))

    def store_last(buf, bar):
        del bar
        buf[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, last_ref.at[b, h, ks, vs])
        plgpu.wait_smem_to_gmem(0)

    with_f32_tile(store_last)


def state_recurrence(a, b, w, w2, decay, x0, y0, *, reverse, chunk_size, block_t=64,
                     block_k=64, block_v=None, max_steps=2, interpret=False):
    """Every chunk-boundary state and the last one (see the module docstring), with the vector
    recurrence y_{c+1} = decay_c y_c + sum_s w2_s a_s alongside (n; dn when reverse).

    a: (B, T, H, K), b: (B, T, H, V) (bf16 or fp16, K and V multiples of 64); w, w2: (B, H, T);
    decay: (B, H, NC); x0 (B, H, K, V), y0 (B, H, K) float32 (C_0, n_0, or dC_T, dn_T).
    Returns states (B, H, NC+1, K, V) in STATE_DTYPE (index c: the state entering chunk c, or
    the cotangent of the state leaving chunk c-1), the vectors (B, H, NC+1, K) float32 likewise,
    and the last state (B, H, K, V) float32 (C_T, or dC_0 when reverse).
    """
    B, T, H, K = a.shape
    V = b.shape[-1]
    NC = T // chunk_size
    block_v = block_v or min(V, 256)
    w, w2, decay, x0, y0 = (x.astype(F32) for x in (w, w2, decay, x0, y0))
    # TMA needs 16-byte strides: the per-chunk decays are padded to a multiple of 4 floats.
    decay = jnp.pad(decay, ((0, 0), (0, 0), (0, -NC % 4)))
    kernel = functools.partial(_recurrence_kernel, reverse=reverse, chunk_size=chunk_size,
                               block_t=min(block_t, chunk_size), block_k=block_k,
                               block_v=block_v, H=H, max_steps=max_steps,
                               interpret=interpret)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, H, NC + 1, K, V), STATE_DTYPE),
                  jax.ShapeDtypeStruct((B, H, NC + 1, K), F32),
                  jax.ShapeDtypeStruct((B, H, K, V), F32)),
        grid=(K // block_k, V // block_v, B * H),
        grid_names=("k", "v", "bh"),
        interpret=interpret_params(interpret),
        kernel_name="mlstm_state_grads" if reverse else "mlstm_chunk_states",
    )(a, b, w, w2, decay, x0, y0)
