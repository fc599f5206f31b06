"""TFLA backward dq kernel on Mosaic GPU.

Per (b, h), chunk c, query row t (the Triton backend's `bwd.py` has the same math):
    dA_ts = (dh_t . v_s inv_n_t + dden_t) P_ts            (s < t; the diagonal comes last)
    dq_t  = sum_s dA_ts k_s + w_inter_t (inv_n_t dh_t C_c^T + dden_t n_c)
and the row dot q_t . dq_t without the diagonal term (docs/math.md). dA is affine in the score
dh_t . v_s, so the score dimension V is cut into blocks of up to 256 columns that each add their
part of dA k into one float32 accumulator (a V = 512 row stack and tile would not fit in shared
memory). One CTA: 2 x 64 query rows of one chunk, two compute warpgroups and a memory warpgroup
streaming two double-buffered TMA rings shared by both:
  score ring  the C_c^T slices (K x 64) of every V block, then per V block the v tiles (64
              rows, as 64-wide slices) up to the diagonal of the second warpgroup, then q and k
              of each warpgroup's own rows (as 64-wide K slices);
  out ring    the k tiles (64 x K), the B operand of dA k.
The inter term comes first, dh unscaled, and takes its row scale in float32. A
compute warpgroup keeps its dh rows of one V block in SMEM; the score (wgmma), the gates and dA
are in registers and dA is the register A operand of dA k.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tfla_jax.backends.triton.common import idiv, irem  # x64-safe int division
from tfla_jax.backends.mosaic.common import (COLS, F32, LOG2E, ROWS, interpret_params, mma,
                                             observe_releases, row_vector, rows_times, smem)
from tfla_jax.backends.mosaic.fwd import COMPUTE_WGS, KV_TILE, ROWS_PER_WG, SLICE

DQ_ROWS = ("bh", "row", "start", "inv_n", "dden", "w_inter", "qdq")   # qdq: staging
DQ_CHUNK = ("bh", "col")
MAX_SCORE_BLOCK = 256


def _dq_kernel(dh_ref, v_ref, k_ref, q_ref, c_ref, n_ref, row_refs, chunk_refs, dq_ref, qdq_ref,
               *, chunk_size, block_s, H, interpret):
    # dh_ref, v_ref (B, T, H, V); k_ref, q_ref (B, T, H, K); c_ref (B, H, NC+1, K, V) states;
    # n_ref (B, H, NC+1, K) float32; row_refs / chunk_refs: dicts of (B, H, T) vectors;
    # out dq_ref (B, T, H, K), qdq_ref (B, H, T) float32.
    qt, c, z = (lax.axis_index(n) for n in ("q", "c", "bh"))
    wg = lax.axis_index("wg")
    b, h = idiv(z, H), irem(z, H)
    K, V = k_ref.shape[-1], v_ref.shape[-1]
    ns, nv, nk = block_s // SLICE, V // block_s, K // SLICE
    dtype = dh_ref.dtype
    cta_rows = COMPUTE_WGS * ROWS_PER_WG
    chunk0 = c * chunk_size
    n_kv = idiv((qt + 1) * cta_rows + KV_TILE - 1, KV_TILE)   # tiles up to the CTA's diagonal
    # Score-ring steps: nv * ns C_c^T slices, nv * n_kv v tiles (V blocks in reverse order), then
    # q and k of the own rows of each warpgroup (as K slices).
    n_inter, n_tiles = nv * ns, nv * n_kv
    block_of = lambda o: nv - 1 - o  # noqa: E731  the V block of the o-th tile pass

    def body(a_smem, s_ring, o_ring, vecs, chunk_vecs, n_smem, p_smem, bars):
        (in_bars, a_bars, sc_loaded, s_loaded, e_loaded, s_free, o_loaded, o_free,
         done) = bars

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def claim(step):
                slot = irem(step, 2)

                @pl.when(step >= 2)
                def _():
                    plgpu.barrier_wait(s_free.at[slot])

                return slot

            @pl.loop(0, n_inter)
            def _(step):
                slot = claim(step)
                plgpu.copy_gmem_to_smem(c_ref.at[b, h, c, :, pl.ds(step * SLICE, SLICE)],
                                        s_ring.at[slot, pl.ds(0, K)], sc_loaded.at[slot])

            @pl.loop(0, n_tiles)
            def _(t):
                slot = claim(n_inter + t)
                cols = block_of(idiv(t, n_kv)) * block_s
                rows = pl.ds(chunk0 + irem(t, n_kv) * KV_TILE, KV_TILE)
                for u in range(ns):
                    plgpu.copy_gmem_to_smem(
                        v_ref.at[b, rows, h, pl.ds(cols + u * SLICE, SLICE)],
                        s_ring.at[slot, pl.ds(u * SLICE, SLICE)], s_loaded.at[slot])
                oslot = irem(t, 2)

                @pl.when(t >= 2)
                def _():
                    plgpu.barrier_wait(o_free.at[oslot])

                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h], o_ring.at[oslot],
                                        o_loaded.at[oslot])

            for e, (src, w) in enumerate(((q_ref, 0), (q_ref, 1), (k_ref, 0), (k_ref, 1))):
                slot = claim(n_inter + n_tiles + e)
                rows = pl.ds(chunk0 + qt * cta_rows + w * ROWS_PER_WG, ROWS_PER_WG)
                for u in range(nk):
                    plgpu.copy_gmem_to_smem(src.at[b, rows, h, pl.ds(u * SLICE, SLICE)],
                                            s_ring.at[slot, pl.ds(u * SLICE, SLICE)],
                                            e_loaded.at[slot])
            if interpret:   # the hardware needs no wait for the last releases
                observe_releases(s_free, n_inter + n_tiles + 4, 2)
                observe_releases(o_free, n_tiles, 2)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            r0 = qt * cta_rows + wg * ROWS_PER_WG                    # first row in the chunk
            q_rows = pl.ds(chunk0 + r0, ROWS_PER_WG)
            my_a, my_vecs = a_smem.at[wg], {n: vecs[n].at[wg] for n in vecs}
            my_chunk = {n: chunk_vecs[n].at[wg] for n in DQ_CHUNK}
            copies = [(row_refs[n].at[b, h, q_rows], my_vecs[n]) for n in DQ_ROWS[:-1]]
            copies += [(chunk_refs[n].at[b, h, pl.ds(chunk0, chunk_size)], my_chunk[n])
                       for n in DQ_CHUNK]
            copies += [(n_ref.at[b, h, c], n_smem.at[wg])]
            for idx, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, in_bars.at[wg, idx])
            for idx in range(len(copies)):
                plgpu.barrier_wait(in_bars.at[wg, idx])
            load = lambda name: row_vector(my_vecs[name])  # noqa: E731
            inv_n, dden, w_inter = load("inv_n"), load("dden"), load("w_inter")
            bh_q, row_q, start_q = load("bh"), load("row"), load("start")
            scratch = p_smem.at[wg] if interpret else None
            zero = c * 0   # a traced 0: wgmma operands cannot take static slot indices

            def load_a(vb):
                """This warpgroup's dh rows of V block vb into SMEM (as 64-wide slices)."""
                for u in range(ns):
                    plgpu.copy_gmem_to_smem(
                        dh_ref.at[b, q_rows, h, pl.ds(vb * block_s + u * SLICE, SLICE)],
                        my_a.at[u], a_bars.at[wg, u])
                for u in range(ns):
                    plgpu.barrier_wait(a_bars.at[wg, u])

            def take(bar, slot):
                plgpu.barrier_wait(bar.at[slot])
                return s_ring.at[slot]

            # 1. inter term dh C_c^T (dh exact in registers), scaled by w_inter inv_n in
            # float32 before any tile adds in (a bf16 operand w dh would round the scale).
            acc = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG, K), F32), plgpu.Layout.WGMMA)
            for vb in range(nv):
                load_a(vb)
                for u in range(ns):
                    slot = zero + (vb * ns + u) % 2
                    tile = take(sc_loaded, slot)
                    a = plgpu.load(my_a.at[u], layout=plgpu.Layout.WGMMA)
                    acc = mma(acc, a, tile.at[pl.ds(0, K)].transpose((1, 0)),
                              interpret=interpret, scratch=scratch)
                    plgpu.barrier_arrive(s_free.at[slot])
            n_c = plgpu.load(n_smem.at[wg], layout=COLS)
            acc = rows_times(w_inter * inv_n, acc) + (
                lax.broadcast_in_dim(w_inter * dden, acc.shape, [0])
                * lax.broadcast_in_dim(n_c, acc.shape, [1]))

            # 2. tiles up to this warpgroup's diagonal, per V block; the rest are only waited for.
            shape = (ROWS_PER_WG, KV_TILE)
            q_pos = r0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
            kv_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            rows_of = lambda x: lax.broadcast_in_dim(x, shape, [0])  # noqa: E731
            cols_of = lambda x: lax.broadcast_in_dim(x, shape, [1])  # noqa: E731
            n_own = idiv(r0, KV_TILE) + 1      # tiles up to and including the diagonal one
            diag = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG,), F32), ROWS)

            for o in range(nv):
                vb = block_of(o)
                if o:
                    load_a(vb)      # the last V block of the inter term is still in SMEM

                def step(j, carry, o=o, vb=vb):
                    acc, diag = carry
                    t = o * n_kv + j
                    slot, oslot = irem(n_inter + t, 2), irem(t, 2)
                    tile = take(s_loaded, slot)

                    def scores(acc_ref):
                        for u in range(ns):
                            plgpu.wgmma(acc_ref, my_a.at[u],
                                        tile.at[pl.ds(u * SLICE, SLICE)].transpose((1, 0)))
                        return acc_ref[...]

                    s = pl.run_scoped(scores, plgpu.ACC(shape, F32))
                    plgpu.barrier_arrive(s_free.at[slot])
                    kv = pl.ds(j * KV_TILE, KV_TILE)
                    bh_k = plgpu.load(my_chunk["bh"].at[kv], layout=COLS)
                    col_k = plgpu.load(my_chunk["col"].at[kv], layout=COLS)
                    kv_pos = j * KV_TILE + kv_iota
                    log_p = (rows_of(bh_q) - cols_of(bh_k)) + rows_of(row_q) + cols_of(col_k)
                    keep = (kv_pos < q_pos) & (kv_pos >= rows_of(start_q))
                    p = jnp.exp2(jnp.where(keep, log_p, -jnp.inf) * LOG2E)
                    ds = s * rows_of(inv_n) + rows_of(dden) if vb == 0 else s * rows_of(inv_n)
                    diag = diag + jnp.where(kv_pos == q_pos, s, 0.0).sum(axis=1)
                    plgpu.barrier_wait(o_loaded.at[oslot])
                    acc = mma(acc, (ds * p).astype(dtype), o_ring.at[oslot],
                              interpret=interpret, scratch=scratch)
                    plgpu.barrier_arrive(o_free.at[oslot])
                    return acc, diag

                acc, diag = lax.fori_loop(0, n_own, step, (acc, diag))

                @pl.loop(n_own, n_kv)
                def _(j, o=o):
                    t = o * n_kv + j
                    slot, oslot = irem(n_inter + t, 2), irem(t, 2)
                    take(s_loaded, slot)
                    plgpu.barrier_arrive(s_free.at[slot])
                    plgpu.barrier_wait(o_loaded.at[oslot])
                    plgpu.barrier_arrive(o_free.at[oslot])

            # 3. q . dq without the diagonal, then the diagonal term, from the K slices of the
            # own q and k rows (prefetched into the ring; the other warpgroup's are skipped).
            col_t = plgpu.load(my_chunk["col"].at[pl.ds(r0, ROWS_PER_WG)], layout=ROWS)
            d_diag = (diag * inv_n + dden) * jnp.exp2((row_q + col_t) * LOG2E)
            cols = [pl.ds(u * SLICE, SLICE) for u in range(nk)]
            part = lambda x, u: x[:, u * SLICE:(u + 1) * SLICE]  # noqa: E731
            slice_of = lambda t, u: plgpu.load(t.at[cols[u]], layout=plgpu.Layout.WGMMA)  # noqa
            first_e = n_inter + n_tiles    # ring steps: q of warpgroup 0, 1, then k of 0, 1

            def own(e):
                """Wait for epilogue step e (this warpgroup's), then the other one's, in the
                order of each slot's phases; returns this warpgroup's tile and its slot."""
                return take(e_loaded, irem(first_e + e, 2)), irem(first_e + e, 2)

            def skip(e):
                slot = irem(first_e + e, 2)
                take(e_loaded, slot)
                plgpu.barrier_arrive(s_free.at[slot])

            tile, slot = own(wg)
            qdq = sum((slice_of(tile, u).astype(F32) * part(acc, u)).sum(axis=1)
                      for u in range(nk))
            plgpu.barrier_arrive(s_free.at[slot])
            my_vecs["qdq"][...] = qdq
            skip(1 - wg)
            tile, slot = own(2 + wg)
            acc = jnp.concatenate([part(acc, u) + rows_times(d_diag, slice_of(tile, u).astype(F32))
                                   for u in range(nk)], axis=1)
            plgpu.barrier_arrive(s_free.at[slot])
            skip(3 - wg)

            # Both warpgroups are done with the rings: dq leaves through out-ring slot wg.
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            out = o_ring.at[wg]
            out[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, dq_ref.at[b, q_rows, h])
            plgpu.copy_smem_to_gmem(my_vecs["qdq"], qdq_ref.at[b, h, q_rows])
            plgpu.wait_smem_to_gmem(0)

    n_in = len(DQ_ROWS) - 1 + len(DQ_CHUNK) + 1
    pl.run_scoped(
        body,
        smem((COMPUTE_WGS, ns, ROWS_PER_WG, SLICE), dtype),
        smem((2, max(block_s, K), SLICE), dtype),
        smem((2, KV_TILE, K), dtype),
        {n: plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.int32 if n == "start" else F32)
         for n in DQ_ROWS},
        {n: plgpu.SMEM((COMPUTE_WGS, chunk_size), F32) for n in DQ_CHUNK},
        plgpu.SMEM((COMPUTE_WGS, K), F32),
        smem((COMPUTE_WGS, ROWS_PER_WG, KV_TILE), dtype) if interpret else None,
        (plgpu.Barrier(num_barriers=(COMPUTE_WGS, n_in)),
         plgpu.Barrier(num_barriers=(COMPUTE_WGS, ns)),
         plgpu.Barrier(num_barriers=2),
         plgpu.Barrier(num_arrivals=ns, num_barriers=2),
         plgpu.Barrier(num_arrivals=nk, num_barriers=2),
         plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
         plgpu.Barrier(num_barriers=2),
         plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
         plgpu.Barrier(num_arrivals=COMPUTE_WGS)),
        collective_axes="wg")


def score_block(V: int) -> int:
    """The V block of the score: the largest multiple of 64 <= 256 dividing V."""
    b = min(V, MAX_SCORE_BLOCK)
    while V % b:
        b -= SLICE
    return b


def chunk_dq(q, k, v, dh, c_states, n_states, rows, chunk, *, chunk_size, interpret=False):
    """dq (B, T, H, K) in q's dtype and q . dq without the diagonal term (B, H, T) float32.

    q, k: (B, T, H, K), v, dh: (B, T, H, V) (bf16, K <= 256 and V multiples of 64, L a multiple
    of 128); c_states (B, H, NC+1, K, V) bf16 (index c: the state entering chunk c), n_states
    (B, H, NC+1, K) float32; rows: dict of (B, H, T) vectors `DQ_ROWS` (but qdq); chunk: dict of
    `DQ_CHUNK`.
    """
    B, T, H, K = q.shape
    kernel = functools.partial(_dq_kernel, chunk_size=chunk_size, block_s=score_block(v.shape[-1]),
                               H=H, interpret=interpret)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T, H, K), q.dtype),
                  jax.ShapeDtypeStruct((B, H, T), F32)),
        grid=(chunk_size // (COMPUTE_WGS * ROWS_PER_WG), T // chunk_size, B * H),
        grid_names=("q", "c", "bh"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name="mlstm_bwd_dq",
    )(dh, v, k, q, c_states, n_states, {n: rows[n] for n in DQ_ROWS[:-1]},
      {n: chunk[n] for n in DQ_CHUNK})
