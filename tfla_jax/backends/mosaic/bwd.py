"""TFLA backward dq and dk kernels on Mosaic GPU: one kernel body, dk being dq transposed.

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
are in registers and dA is the register A operand of dA k. dk (`chunk_dk`) runs the same body
with rows as keys: v rows against dh tiles, q tiles as the out ring, dC_{c+1} for the inter term,
dA^T in the same V blocks (so dq and dk round dA alike, which the forget-gate gradient needs).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tfla_jax.backends.triton.common import idiv, irem  # x64-safe int division
from tfla_jax.backends.mosaic.common import (COLS, F32, LOG2E, ROWS, interpret_params, mma,
                                             observe_releases, row_vector, rows_times, smem,
                                             tile_frame)
from tfla_jax.backends.mosaic.fwd import (COMPUTE_WGS, KV_TILE, ROWS_PER_WG, SLICE,
                                          ring_barriers, vector_scratch)

DQ_ROWS = ("bh", "row", "start", "inv_n", "dden", "w_inter")
DQ_CHUNK = ("bh", "col")
DK_ROWS = ("bh", "col", "w_state")                 # transposed: rows are keys s
DK_CHUNK = ("bh", "row", "start", "inv_n", "dden")
# Own-row tensors the score ring brings in after the tiles (and, for dk, after the inter term),
# and what each is for: a row dot with the accumulator, or the diagonal term.
DQ_END = (("q", "qdq"), ("k", "diag"))
DK_MID = (("k", "kdk_inter"),)
DK_END = (("k", "kdot"), ("q", "diag"), ("k", "kdk"))
MAX_SCORE_BLOCK = 256


def _grad_kernel(a_ref, s_ref, o_ref, q_ref, k_ref, c_ref, n_ref, row_refs, chunk_refs, g_ref,
                 *dot_refs, chunk_size, block_s, H, transpose, interpret):
    # dq: a_ref = dh, s_ref = v (B, T, H, V), o_ref = k; c_ref C (B, H, NC+1, K, V), n_ref n
    #     (B, H, NC+1, K) float32; out g_ref dq (B, T, H, K), dot_refs: q . dq (B, H, T).
    # dk (transpose): a_ref = v, s_ref = dh, o_ref = q; c_ref dC, n_ref dn; out g_ref dk,
    #     dot_refs: k . dk^intra without the diagonal, k . its chunk-state part, k . dk.
    # q_ref, k_ref (B, T, H, K): the own rows for the row dots and the diagonal term.
    qt, c, z = (lax.axis_index(n) for n in ("q", "c", "bh"))
    wg = lax.axis_index("wg")
    b, h = idiv(z, H), irem(z, H)
    K, V = k_ref.shape[-1], s_ref.shape[-1]
    ns, nv, nk = block_s // SLICE, V // block_s, K // SLICE
    dtype = a_ref.dtype
    cta_rows = COMPUTE_WGS * ROWS_PER_WG
    chunk0 = c * chunk_size
    row_names, chunk_names = (DK_ROWS, DK_CHUNK) if transpose else (DQ_ROWS, DQ_CHUNK)
    mid, end = (DK_MID, DK_END) if transpose else ((), DQ_END)
    out_names = ("kdk_off", "kdk_inter", "kdk") if transpose else ("qdq",)
    own_of = {"q": q_ref, "k": k_ref}
    state = c + 1 if transpose else c     # dC_{c+1}: the cotangent of the state leaving chunk c
    # Tiles [j0, j1) reach this CTA's rows: up to the diagonal of its last row, or transposed
    # from the diagonal of its first row to the chunk's end.
    if transpose:
        j0, j1 = idiv(qt * cta_rows, KV_TILE), chunk_size // KV_TILE
    else:
        j0, j1 = 0, idiv((qt + 1) * cta_rows + KV_TILE - 1, KV_TILE)
    n_cta = j1 - j0
    # Score-ring steps: nv * ns C^T slices (every V block), the mid own-row tensors (one step
    # per warpgroup each), nv * n_cta tiles (V blocks in reverse order), the end ones.
    n_inter, n_tiles = nv * ns, nv * n_cta
    first_tile = n_inter + 2 * len(mid)
    first_end = first_tile + n_tiles
    n_steps = first_end + 2 * len(end)
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

            def own_rows(first, names):
                for e, (name, _) in enumerate(names):
                    for w in range(COMPUTE_WGS):
                        slot = claim(c * 0 + first + 2 * e + w)   # traced: see `zero`
                        rows = pl.ds(chunk0 + qt * cta_rows + w * ROWS_PER_WG, ROWS_PER_WG)
                        for u in range(nk):
                            plgpu.copy_gmem_to_smem(
                                own_of[name].at[b, rows, h, pl.ds(u * SLICE, SLICE)],
                                s_ring.at[slot, pl.ds(u * SLICE, SLICE)], e_loaded.at[slot])

            @pl.loop(0, n_inter)
            def _(step):
                slot = claim(step)
                plgpu.copy_gmem_to_smem(c_ref.at[b, h, state, :, pl.ds(step * SLICE, SLICE)],
                                        s_ring.at[slot, pl.ds(0, K)], sc_loaded.at[slot])

            own_rows(n_inter, mid)

            @pl.loop(0, n_tiles)
            def _(t):
                slot = claim(first_tile + t)
                cols = block_of(idiv(t, n_cta)) * block_s
                rows = pl.ds(chunk0 + (j0 + irem(t, n_cta)) * KV_TILE, KV_TILE)
                for u in range(ns):
                    plgpu.copy_gmem_to_smem(
                        s_ref.at[b, rows, h, pl.ds(cols + u * SLICE, SLICE)],
                        s_ring.at[slot, pl.ds(u * SLICE, SLICE)], s_loaded.at[slot])
                oslot = irem(t, 2)

                @pl.when(t >= 2)
                def _():
                    plgpu.barrier_wait(o_free.at[oslot])

                plgpu.copy_gmem_to_smem(o_ref.at[b, rows, h], o_ring.at[oslot],
                                        o_loaded.at[oslot])

            own_rows(first_end, end)
            if interpret:   # the hardware needs no wait for the last releases
                observe_releases(s_free, n_steps, 2)
                observe_releases(o_free, n_tiles, 2)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            r0 = qt * cta_rows + wg * ROWS_PER_WG                    # first row in the chunk
            my_rows = pl.ds(chunk0 + r0, ROWS_PER_WG)
            own = pl.ds(r0, ROWS_PER_WG)
            my_a, my_vecs = a_smem.at[wg], {n: vecs[n].at[wg] for n in vecs}
            my_chunk = {n: chunk_vecs[n].at[wg] for n in chunk_names}
            copies = [(row_refs[n].at[b, h, my_rows], my_vecs[n]) for n in row_names]
            copies += [(chunk_refs[n].at[b, h, pl.ds(chunk0, chunk_size)], my_chunk[n])
                       for n in chunk_names]
            copies += [(n_ref.at[b, h, state], n_smem.at[wg])]
            for idx, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, in_bars.at[wg, idx])
            for idx in range(len(copies)):
                plgpu.barrier_wait(in_bars.at[wg, idx])
            load = lambda name: row_vector(my_vecs[name])  # noqa: E731
            own_vec = lambda name: plgpu.load(my_chunk[name].at[own], layout=ROWS)  # noqa
            scratch = p_smem.at[wg] if interpret else None
            zero = c * 0   # a traced 0: wgmma operands cannot take static slot indices
            if transpose:
                inv_n, dden, row = own_vec("inv_n"), own_vec("dden"), own_vec("row")
                col, w_state = load("col"), load("w_state")
                scale, vec_scale = w_state, w_state
            else:
                inv_n, dden, row = load("inv_n"), load("dden"), load("row")
                col, w_inter = own_vec("col"), load("w_inter")
                scale, vec_scale = w_inter * inv_n, w_inter * dden

            def load_a(vb):
                """This warpgroup's rows of the score operand, V block vb, into SMEM."""
                for u in range(ns):
                    plgpu.copy_gmem_to_smem(
                        a_ref.at[b, my_rows, h, pl.ds(vb * block_s + u * SLICE, SLICE)],
                        my_a.at[u], a_bars.at[wg, u])
                for u in range(ns):
                    plgpu.barrier_wait(a_bars.at[wg, u])

            def take(bar, slot):
                plgpu.barrier_wait(bar.at[slot])
                return s_ring.at[slot]

            # 1. inter term a C^T (a exact in registers), then its row scale in float32 (a bf16
            # operand w a would round the scale into the product) and the vector term.
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
            acc = rows_times(scale, acc) + (lax.broadcast_in_dim(vec_scale, acc.shape, [0])
                                            * lax.broadcast_in_dim(n_c, acc.shape, [1]))

            cols = [pl.ds(u * SLICE, SLICE) for u in range(nk)]
            part = lambda x, u: x[:, u * SLICE:(u + 1) * SLICE]  # noqa: E731
            piece = lambda t, u: plgpu.load(t.at[cols[u]], layout=plgpu.Layout.WGMMA)  # noqa

            def own_steps(first, names, acc, dots, d_diag=None):
                """This warpgroup's own-row steps (and the other one's, only waited for, in the
                order of each slot's phases)."""
                for e, (_, what) in enumerate(names):
                    for mine, w in ((True, wg), (False, 1 - wg)):
                        slot = irem(first + 2 * e + w, 2)
                        tile = take(e_loaded, slot)
                        if mine:
                            if what == "diag":
                                acc = jnp.concatenate(
                                    [part(acc, u) + rows_times(d_diag,
                                                               piece(tile, u).astype(F32))
                                     for u in range(nk)], axis=1)
                            else:
                                dots[what] = sum(
                                    (piece(tile, u).astype(F32) * part(acc, u)).sum(axis=1)
                                    for u in range(nk))
                        plgpu.barrier_arrive(s_free.at[slot])
                return acc

            dots = {}
            acc = own_steps(n_inter, mid, acc, dots)

            # 2. the tiles on this warpgroup's side of its diagonal, per V block; the rest are
            # only waited for.
            shape = (ROWS_PER_WG, KV_TILE)
            r_pos, t_iota, rows_of, cols_of = tile_frame(r0, shape)
            if transpose:
                own0, own1 = idiv(r0, KV_TILE), j1
                bh_r = load("bh")
            else:
                own0, own1 = j0, idiv(r0, KV_TILE) + 1   # up to and including the diagonal
                bh_r, start_r = load("bh"), load("start")
            diag = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG,), F32), ROWS)

            def d_a(j, s, first_block):
                """dA (dq) or dA^T (dk) of tile j in registers, the diagonal left out."""
                kv = pl.ds(j * KV_TILE, KV_TILE)
                col_vec = lambda name: cols_of(  # noqa: E731
                    plgpu.load(my_chunk[name].at[kv], layout=COLS))
                t_pos = j * KV_TILE + t_iota
                if transpose:    # rows s, columns t: t > s >= start_t
                    log_p = ((col_vec("bh") - rows_of(bh_r)) + col_vec("row")) + rows_of(col)
                    keep = (t_pos > r_pos) & (r_pos >= col_vec("start"))
                    ds = s * col_vec("inv_n") + (col_vec("dden") if first_block else 0.0)
                else:            # rows t, columns s: start_t <= s < t
                    log_p = ((rows_of(bh_r) - col_vec("bh")) + rows_of(row)) + col_vec("col")
                    keep = (t_pos < r_pos) & (t_pos >= rows_of(start_r))
                    ds = s * rows_of(inv_n) + (rows_of(dden) if first_block else 0.0)
                return ds * jnp.exp2(jnp.where(keep, log_p, -jnp.inf) * LOG2E)

            def slots(o, j):
                t = o * n_cta + j - j0
                return irem(first_tile + t, 2), irem(t, 2)

            for o in range(nv):
                vb = block_of(o)
                if o:
                    load_a(vb)      # the last V block of the inter term is still in SMEM

                def wait_only(j, o=o):
                    slot, oslot = slots(o, j)
                    take(s_loaded, slot)
                    plgpu.barrier_arrive(s_free.at[slot])
                    plgpu.barrier_wait(o_loaded.at[oslot])
                    plgpu.barrier_arrive(o_free.at[oslot])

                def step(j, carry, o=o, vb=vb):
                    acc, diag = carry
                    slot, oslot = slots(o, j)
                    tile = take(s_loaded, slot)

                    def scores(acc_ref):
                        for u in range(ns):
                            plgpu.wgmma(acc_ref, my_a.at[u],
                                        tile.at[pl.ds(u * SLICE, SLICE)].transpose((1, 0)))
                        return acc_ref[...]

                    s = pl.run_scoped(scores, plgpu.ACC(shape, F32))
                    plgpu.barrier_arrive(s_free.at[slot])
                    diag = diag + jnp.where(j * KV_TILE + t_iota == r_pos, s, 0.0).sum(axis=1)
                    plgpu.barrier_wait(o_loaded.at[oslot])
                    acc = mma(acc, d_a(j, s, vb == 0).astype(dtype), o_ring.at[oslot],
                              interpret=interpret, scratch=scratch)
                    plgpu.barrier_arrive(o_free.at[oslot])
                    return acc, diag

                pl.loop(j0, own0)(wait_only)
                acc, diag = lax.fori_loop(own0, own1, step, (acc, diag))
                pl.loop(own1, j1)(wait_only)

            # 3. the row dots and the diagonal term d_diag (q or k of the own rows).
            d_diag = (diag * inv_n + dden) * jnp.exp2((row + col) * LOG2E)
            acc = own_steps(first_end, end, acc, dots, d_diag)
            if transpose:
                dots["kdk_off"] = dots.pop("kdot") - dots["kdk_inter"]
            for name in out_names:
                my_vecs[name][...] = dots[name]

            # Both warpgroups are done with the rings: the gradient leaves through slot wg.
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            out = o_ring.at[wg]
            out[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, g_ref.at[b, my_rows, h])
            for name, ref in zip(out_names, dot_refs):
                plgpu.copy_smem_to_gmem(my_vecs[name], ref.at[b, h, my_rows])
            plgpu.wait_smem_to_gmem(0)

    n_in = len(row_names) + len(chunk_names) + 1
    pl.run_scoped(
        body,
        smem((COMPUTE_WGS, ns, ROWS_PER_WG, SLICE), dtype),
        smem((2, max(block_s, K), SLICE), dtype),
        smem((2, KV_TILE, K), dtype),
        *vector_scratch(row_names + out_names, chunk_names, chunk_size),
        plgpu.SMEM((COMPUTE_WGS, K), F32),
        smem((COMPUTE_WGS, ROWS_PER_WG, KV_TILE), dtype) if interpret else None,
        (plgpu.Barrier(num_barriers=(COMPUTE_WGS, n_in)),
         plgpu.Barrier(num_barriers=(COMPUTE_WGS, ns)),
         plgpu.Barrier(num_barriers=2),                   # sc_loaded (C^T slices)
         plgpu.Barrier(num_arrivals=ns, num_barriers=2),  # s_loaded (tiles)
         *ring_barriers(nk),                              # e_loaded (own rows), s_free
         *ring_barriers(1),                               # o_loaded, o_free
         plgpu.Barrier(num_arrivals=COMPUTE_WGS)),
        collective_axes="wg")


def score_block(V: int) -> int:
    """The V block of the score: the largest multiple of 64 <= 256 dividing V."""
    b = min(V, MAX_SCORE_BLOCK)
    while V % b:
        b -= SLICE
    return b


def _launch(inputs, n_dots, *, chunk_size, transpose, name, interpret):
    s_, q = inputs[1], inputs[3]
    B, T, H, K = q.shape
    kernel = functools.partial(_grad_kernel, chunk_size=chunk_size,
                               block_s=score_block(s_.shape[-1]), H=H, transpose=transpose,
                               interpret=interpret)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T, H, K), q.dtype),
                  *[jax.ShapeDtypeStruct((B, H, T), F32)] * n_dots),
        grid=(chunk_size // (COMPUTE_WGS * ROWS_PER_WG), T // chunk_size, B * H),
        grid_names=("q", "c", "bh"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name=name,
    )(*inputs)


def chunk_dq(q, k, v, dh, c_states, n_states, rows, chunk, *, chunk_size, interpret=False):
    """dq (B, T, H, K) in q's dtype and q . dq without the diagonal term (B, H, T) float32.

    q, k: (B, T, H, K), v, dh: (B, T, H, V) (bf16, K <= 256 and V multiples of 64, L a multiple
    of 128); c_states (B, H, NC+1, K, V) bf16 (index c: the state entering chunk c), n_states
    (B, H, NC+1, K) float32; rows: dict of (B, H, T) vectors `DQ_ROWS`; chunk: dict of
    `DQ_CHUNK`.
    """
    return _launch((dh, v, k, q, k, c_states, n_states, {n: rows[n] for n in DQ_ROWS},
                    {n: chunk[n] for n in DQ_CHUNK}), 1, chunk_size=chunk_size,
                   transpose=False, name="mlstm_bwd_dq", interpret=interpret)


def chunk_dk(q, k, v, dh, dc_states, dn_states, rows, chunk, *, chunk_size, interpret=False):
    """dk (B, T, H, K) in k's dtype and three row dots (B, H, T) float32 of k with: the in-chunk
    part of dk without the diagonal term, its chunk-state part, all of dk. The kernel of
    `chunk_dq` transposed (rows are keys s; `KernelGrads` in tfla_jax/backends/base.py):
        dk_s = sum_{t > s >= start_t} dA_ts q_t + dA_ss q_s + w_state_s (v_s dC_{c+1}^T + dn_{c+1})

    As `chunk_dq`, with dc_states / dn_states the cotangents (index c+1: of the state leaving
    chunk c); rows: dict of `DK_ROWS`; chunk: dict of `DK_CHUNK`. The in-chunk dot is k . (all
    but the diagonal) minus the chunk-state dot (both float32 from one accumulator).
    """
    return _launch((v, dh, q, q, k, dc_states, dn_states, {n: rows[n] for n in DK_ROWS},
                    {n: chunk[n] for n in DK_CHUNK}), 3, chunk_size=chunk_size,
                   transpose=True, name="mlstm_bwd_dk", interpret=interpret)
