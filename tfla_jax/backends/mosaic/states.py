"""The chunk-state recurrence on Mosaic GPU, one kernel for both directions.

forward  (a, b, w) = (k, v, w_state):   X_{c+1} = decay_c X_c + (w a_c)^T b_c,   X_0 = C_0
reverse  (a, b, w) = (q, dh, w_inter inv_n):  X_c = decay_c X_{c+1} + (w a_c)^T b_c,  X_NC = dC_T,
         optionally with the carried-state terms decay_c <C_c, X_{c+1}> of the forget gate
One CTA owns a (wk block_k x wv block_v) tile of X for one (b, h) and runs over the chunks:
wk x wv compute warpgroups, each carrying its float32 (block_k x block_v) tile in registers,
and a memory warpgroup that streams the a / b rows through `stages` TMA slots in sub-blocks of
`block_t` rows. The warpgroups of a CTA share the rows they load (two along K share b = v, the
wide operand), which halves the bytes a CTA brings in per state element. The row weight w is
applied in registers on the way from the TMA tile to the wgmma operand; every boundary state
goes out in bf16 (STATE_DTYPE) through an SMEM staging tile and a TMA store. The reverse
recurrence with the carried terms also reads C_c at every chunk boundary: prefetched by the
memory warpgroup with one compute warpgroup, read from GMEM with two (no SMEM left for it).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tfla_jax.backends.triton.common import idiv, irem  # x64-safe int division
from tfla_jax.backends.mosaic.common import (COLS, F32, STATE_DTYPE, interpret_params, mma,
                                             observe_releases, row_vector, rows_times, smem)
from tfla_jax.backends.mosaic.config import TMA_BOX, warpgroup_split

MEMORY_REGISTERS = 40
SLICE = 64   # columns of C_c per load of the carried terms
COMPUTE_REGISTERS = {1: 232, 2: 232}   # setmaxnreg: <= 256, multiples of 8


def _recurrence_kernel(*refs, reverse, carried, chunk_size, block_t, block_k, block_v, wk, wv,
                       H, stages, interpret):
    # a_ref (B, T, H, K), b_ref (B, T, H, V), w_ref, w2_ref (B, H, T), decay_ref (B, H, NC),
    # x0_ref (B, H, K, V), y0_ref (B, H, K) f32, [carried: c_ref (B, H, NC+1, K, V)];
    # out states_ref (B, H, NC+1, K, V) bf16, vec_ref (B, H, NC+1, K) f32 (written by the
    # first V tile), last_ref (B, H, K, V) f32, [carried: zc_ref (B, H, V/block_v, NC, K) f32].
    a_ref, b_ref, w_ref, w2_ref, decay_ref, x0_ref, y0_ref, *refs = refs
    c_ref = refs.pop(0) if carried else None
    states_ref, vec_ref, last_ref, *refs = refs
    zc_ref = refs[0] if carried else None
    kt, vt, z = lax.axis_index("k"), lax.axis_index("v"), lax.axis_index("bh")
    wg = lax.axis_index("wg")
    n_wg = wk * wv
    b, h = idiv(z, H), irem(z, H)
    T = a_ref.shape[1]
    NC = T // chunk_size
    n_sub = chunk_size // block_t
    n_steps = NC * n_sub

    def rows(j):
        """Row sub-block of step j (reverse: the sub-blocks of chunk NC-1-c in order)."""
        if reverse:
            c, r = idiv(j, n_sub), irem(j, n_sub)
            return pl.ds(((NC - 1 - c) * n_sub + r) * block_t, block_t)
        return pl.ds(j * block_t, block_t)

    # One SMEM allocation per K / V tile and per warpgroup (lists of refs, selected by a
    # static index): a wgmma operand cannot be indexed by a static int (the slot index is
    # traced), and a transposed operand stays a whole allocation.
    # With one compute warpgroup, the memory warpgroup also prefetches C_c for the carried terms
    # by TMA (one chunk ahead of its use); with two, their C tiles would not fit in SMEM and
    # the compute warpgroups read C_c from GMEM at the chunk boundary.
    prefetch = carried and n_wg == 1
    first_sub = lambda j: irem(j, n_sub) == 0  # noqa: E731
    chunk_of = lambda j: NC - 1 - idiv(j, n_sub) if reverse else idiv(j, n_sub)  # noqa: E731

    def body(a_smem, b_smem, w_smem, w2_smem, aw_smem, out_smem, decay_smem, y_smem, z_smem,
             c_smem, loaded, free, in_bars, decay_bars, c_loaded, c_free):
        @pl.when(wg == n_wg)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

            @pl.loop(0, n_steps)
            def _(j):
                slot = irem(j, stages)

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                r = rows(j)
                for u in range(wk):
                    plgpu.copy_gmem_to_smem(
                        a_ref.at[b, r, h, pl.ds((kt * wk + u) * block_k, block_k)],
                        a_smem[u].at[slot], loaded.at[slot])
                for u in range(wv):
                    plgpu.copy_gmem_to_smem(
                        b_ref.at[b, r, h, pl.ds((vt * wv + u) * block_v, block_v)],
                        b_smem[u].at[slot], loaded.at[slot])
                plgpu.copy_gmem_to_smem(w_ref.at[b, h, r], w_smem.at[slot], loaded.at[slot])
                plgpu.copy_gmem_to_smem(w2_ref.at[b, h, r], w2_smem.at[slot], loaded.at[slot])
                if prefetch:
                    @pl.when(first_sub(j))
                    def _():
                        @pl.when(j > 0)
                        def _():
                            plgpu.barrier_wait(c_free)   # the previous chunk's C is read

                        for p, tile in enumerate(c_smem):
                            plgpu.copy_gmem_to_smem(
                                c_ref.at[b, h, chunk_of(j), pl.ds(kt * block_k, block_k),
                                         pl.ds(vt * block_v + p * SLICE, SLICE)],
                                tile, c_loaded)

            observe_releases(free, n_steps, stages)

            if prefetch:
                plgpu.barrier_wait(c_free)

        def compute(u):
            """Compute warpgroup u (static: every SMEM offset and TMA box is a constant)."""
            ku, vu = divmod(u, wv)
            ks = pl.ds((kt * wk + ku) * block_k, block_k)
            vs = pl.ds((vt * wv + vu) * block_v, block_v)
            # Warpgroup 0 carries the vector recurrence for every K tile of the CTA: a column
            # sum goes through the kernel's one cross-warp reduction scratch, which two
            # warpgroups reducing at once would share.
            y_tiles = range(wk) if u == 0 else ()
            k_tile = lambda kk: pl.ds((kt * wk + kk) * block_k, block_k)  # noqa: E731
            my_aw, my_out, my_decay = aw_smem[u], out_smem[u], decay_smem[u]
            # A TMA copy moves at most TMA_BOX elements per dimension: the decays of a long
            # sequence arrive in pieces, all on one barrier (one arrival per piece).
            for p0 in range(0, my_decay.shape[0], TMA_BOX):
                piece = pl.ds(p0, min(TMA_BOX, my_decay.shape[0] - p0))
                plgpu.copy_gmem_to_smem(decay_ref.at[b, h, piece], my_decay.at[piece],
                                        decay_bars.at[u])
            for kk in y_tiles:
                plgpu.copy_gmem_to_smem(y0_ref.at[b, h, k_tile(kk)], y_smem[kk],
                                        in_bars.at[u, kk])
            x = plgpu.load(x0_ref.at[b, h, ks, vs], layout=plgpu.Layout.WGMMA, optimized=False)
            plgpu.barrier_wait(decay_bars.at[u])
            for kk in y_tiles:
                plgpu.barrier_wait(in_bars.at[u, kk])
            y = tuple(plgpu.load(y_smem[kk], layout=COLS) for kk in y_tiles)

            def store(idx, x, y):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the staging tiles are free
                my_out[...] = x.astype(my_out.dtype)
                for kk, yk in zip(y_tiles, y):
                    y_smem[kk][...] = yk
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(my_out, states_ref.at[b, h, idx, ks, vs])
                if y_tiles:
                    @pl.when(vt == 0)
                    def _():
                        for kk in y_tiles:
                            plgpu.copy_smem_to_gmem(y_smem[kk], vec_ref.at[b, h, idx, k_tile(kk)])

            def carried_term(chunk, x):
                """decay_c <C_c, X_{c+1}> over this tile's V columns, per K row (the
                forget-gate gradient's boundary terms), C_c read in 64-column slices."""
                z = None
                if prefetch:
                    plgpu.barrier_wait(c_loaded)
                for p in range(block_v // SLICE):
                    if prefetch:
                        c = plgpu.load(c_smem[p], layout=plgpu.Layout.WGMMA)
                    else:
                        cols = pl.ds((vt * wv + vu) * block_v + p * SLICE, SLICE)
                        c = plgpu.load(c_ref.at[b, h, chunk, ks, cols],
                                       layout=plgpu.Layout.WGMMA, optimized=False)
                    part = (c.astype(F32) * x[:, p * SLICE:(p + 1) * SLICE]).sum(axis=1)
                    z = part if z is None else z + part
                if prefetch:
                    plgpu.barrier_arrive(c_free)
                # store() has just waited for every earlier copy out of SMEM: z_smem is free.
                z_smem[u][...] = z * my_decay[chunk]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(z_smem[u], zc_ref.at[b, h, vt * wv + vu, chunk, ks])

            def step(j, carry):
                x, y = carry
                slot = irem(j, stages)
                chunk, first = chunk_of(j), first_sub(j)

                @pl.when(first)
                def _():
                    store(chunk + 1 if reverse else chunk, x, y)
                    if carried:
                        carried_term(chunk, x)

                d = jnp.where(first, my_decay[chunk], 1.0)
                plgpu.barrier_wait(loaded.at[slot])
                load_a = lambda kk: plgpu.load(  # noqa: E731
                    a_smem[kk].at[slot], layout=plgpu.Layout.WGMMA).astype(F32)
                a = load_a(ku)
                my_aw[...] = rows_times(row_vector(w_smem.at[slot]), a).astype(my_aw.dtype)
                plgpu.commit_smem()
                w2 = row_vector(w2_smem.at[slot])
                y = tuple(yk * d + rows_times(w2, a if kk == ku else load_a(kk)).sum(axis=0)
                          for kk, yk in zip(y_tiles, y))
                x = mma(x * d, my_aw.transpose((1, 0)), b_smem[vu].at[slot], interpret=interpret)
                plgpu.barrier_arrive(free.at[slot])
                return x, y

            x, y = lax.fori_loop(0, n_steps, step, (x, y))
            store(0 if reverse else NC, x, y)
            last_ref.at[b, h, ks, vs][...] = x
            plgpu.wait_smem_to_gmem(0)

        for u in range(n_wg):
            @pl.when(wg == u)
            def _():
                plgpu.set_max_registers(COMPUTE_REGISTERS[n_wg], action="increase")
                compute(u)

    dtype = a_ref.dtype
    pl.run_scoped(
        body,
        [smem((stages, block_t, block_k), dtype) for _ in range(wk)],
        [smem((stages, block_t, block_v), b_ref.dtype) for _ in range(wv)],
        plgpu.SMEM((stages, block_t), F32),
        plgpu.SMEM((stages, block_t), F32),
        [smem((block_t, block_k), dtype) for _ in range(n_wg)],
        [smem((block_k, block_v), STATE_DTYPE) for _ in range(n_wg)],
        [plgpu.SMEM(decay_ref.shape[-1:], F32) for _ in range(n_wg)],
        [plgpu.SMEM((block_k,), F32) for _ in range(wk)],
        [plgpu.SMEM((block_k,), F32) for _ in range(n_wg if carried else 0)],
        [smem((block_k, SLICE), STATE_DTYPE) for _ in range(block_v // SLICE if prefetch else 0)],
        plgpu.Barrier(num_arrivals=wk + wv + 2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=n_wg, num_barriers=stages),
        plgpu.Barrier(num_barriers=(n_wg, wk)),
        plgpu.Barrier(num_arrivals=-(-decay_ref.shape[-1] // TMA_BOX), num_barriers=n_wg),
        plgpu.Barrier(num_arrivals=block_v // SLICE) if prefetch else None,
        plgpu.Barrier() if prefetch else None,
        collective_axes="wg")


def state_recurrence(a, b, w, w2, decay, x0, y0, *, reverse, chunk_size, block_t=64,
                     block_k=64, block_v=None, max_steps=2, warpgroups=2, carried=None,
                     interpret=False):
    """Every chunk-boundary state and the last one (see the module docstring), with the vector
    recurrence y_{c+1} = decay_c y_c + sum_s w2_s a_s alongside (n; dn when reverse).

    a: (B, T, H, K), b: (B, T, H, V) (bf16 or fp16, K and V multiples of 64); w, w2: (B, H, T);
    decay: (B, H, NC); x0 (B, H, K, V), y0 (B, H, K) float32 (C_0, n_0, or dC_T, dn_T).
    block_k x block_v: one warpgroup's tile; warpgroups: compute warpgroups per CTA (1 or 2).
    carried (reverse only): the forward's states C (B, H, NC+1, K, V); then also returned, per
    V tile of block_v columns, decay_c sum_v C_c X_{c+1} (B, H, V/block_v, NC, K) float32: the
    carried-state terms decay_c <C_c, dC_{c+1}> of the forget-gate gradient, summed over the
    last two axes.
    Returns states (B, H, NC+1, K, V) in STATE_DTYPE (index c: the state entering chunk c, or
    the cotangent of the state leaving chunk c-1), the vectors (B, H, NC+1, K) float32 likewise,
    and the last state (B, H, K, V) float32 (C_T, or dC_0 when reverse).
    """
    if carried is not None and not reverse:
        raise ValueError("state_recurrence: carried terms belong to the reverse recurrence")
    B, T, H, K = a.shape
    V = b.shape[-1]
    NC = T // chunk_size
    block_v = block_v or min(V, 256)
    wk, wv = warpgroup_split(K, V, block_k, block_v, warpgroups)
    w, w2, decay, x0, y0 = (x.astype(F32) for x in (w, w2, decay, x0, y0))
    # TMA needs 16-byte strides: the per-chunk decays are padded to a multiple of 4 floats.
    decay = jnp.pad(decay, ((0, 0), (0, 0), (0, -NC % 4)))
    kernel = functools.partial(_recurrence_kernel, reverse=reverse,
                               carried=carried is not None, chunk_size=chunk_size,
                               block_t=min(block_t, chunk_size), block_k=block_k,
                               block_v=block_v, wk=wk, wv=wv, H=H,
                               stages=min(max_steps, NC * (chunk_size // min(block_t, chunk_size))),
                               interpret=interpret)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, H, NC + 1, K, V), STATE_DTYPE),
                  jax.ShapeDtypeStruct((B, H, NC + 1, K), F32),
                  jax.ShapeDtypeStruct((B, H, K, V), F32),
                  *([] if carried is None else
                    [jax.ShapeDtypeStruct((B, H, V // block_v, NC, K), F32)])),
        grid=(K // (wk * block_k), V // (wv * block_v), B * H),
        grid_names=("k", "v", "bh"),
        num_threads=wk * wv + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name="mlstm_state_grads" if reverse else "mlstm_chunk_states",
    )(a, b, w, w2, decay, x0, y0, *([] if carried is None else [carried]))
