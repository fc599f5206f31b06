"""TFLA forward output kernel on Mosaic GPU: intra-chunk tiles plus the inter-chunk term.

Per (b, h), chunk c, query row tau (gate vectors from `gates.chunk_gates`, docs/kernels.md):
    num_tau = (w_inter_tau q_tau) C_c + sum_{s} (q_tau . k_s) P_{tau,s} v_s
    den_tau = w_inter_tau q_tau . n_c + sum_{s} (q_tau . k_s) P_{tau,s}
    h_tau   = num_tau / (max(|den_tau|, floor_tau) + eps)          (num_tau without normaliser)
One CTA: 2 x 64 query rows of one chunk and one block_v slice of V, three warpgroups (FA3-style):
two compute warpgroups (64 rows each) and a memory warpgroup that streams, through
double-buffered TMA slots shared by both, first the K/64 slices of C_c (64 x block_v) and then
the kv tiles (k: K/64 slices of 64 x 64, v: 64 x block_v) up to the diagonal of the second
warpgroup. A compute warpgroup:
  1. inter term: (w_inter q) slices in registers (the A operand) times the C_c slices (wgmma),
     q . n_c on the way; the float32 accumulator starts from that product;
  2. per kv tile: S = q k^T (wgmma), the gate matrix applied in registers (WGMMA layout),
     P S in bf16 / fp16 as the register A operand of (P S) v into the same accumulator;
  3. normalise; h is staged in a freed slot and leaves by TMA (den from the first V slice).
q, k live in SMEM as stacks of 64-wide K slices, so every operand is one swizzled 64 x 64 tile.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tfla_jax.backends.triton.common import idiv, irem  # x64-safe int division
from tfla_jax.backends.mosaic.common import (COLS, F32, LOG2E, ROWS, STATE_DTYPE,
                                             interpret_params, mma, observe_releases,
                                             row_vector, rows_times, smem, tile_frame)

ROW_VECTORS = ("bh", "row", "start", "w_inter", "floor")
CHUNK_VECTORS = ("bh", "col")
# transposed (dv): rows are keys s, the tiles queries t
ROW_VECTORS_T = ("bh", "col", "w_state")
CHUNK_VECTORS_T = ("bh", "row", "start", "inv_n")
SLICE = 64          # K slice width of every q / k operand
ROWS_PER_WG = 64    # query rows of one compute warpgroup
KV_TILE = 64        # rows of a kv tile (a freed v slot stages a warpgroup's h: same shape)
COMPUTE_WGS = 2


def vector_scratch(row_names, chunk_names, chunk_size):
    """Per compute warpgroup: SMEM for its rows of each row vector and for the chunk's length
    of each chunk vector ("start" is int32)."""
    dtype = lambda n: jnp.int32 if n == "start" else F32  # noqa: E731
    return ({n: plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), dtype(n)) for n in row_names},
            {n: plgpu.SMEM((COMPUTE_WGS, chunk_size), dtype(n)) for n in chunk_names})


def ring_barriers(copies):
    """(loaded, free) of a two-slot TMA ring: `copies` copies land per slot fill, and every
    compute warpgroup releases each fill."""
    return (plgpu.Barrier(num_arrivals=copies, num_barriers=2),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2))


def _output_kernel(*refs, chunk_size, block_kv, block_v, H, normalize, eps, transpose,
                   interpret):
    # q_ref, k_ref (B, T, H, K); v_ref (B, T, H, V); c_ref (B, H, NC+1, K, V) states;
    # n_ref (B, H, NC+1, K) float32 (not when transposed); row_refs / chunk_refs: dicts of
    # (B, H, T) vectors; out h_ref (B, T, H, V), den_ref (B, H, T) (not when transposed).
    # transpose (dv): q_ref holds k, k_ref q, v_ref dh, c_ref dC; out dv in h_ref.
    if transpose:
        q_ref, k_ref, v_ref, c_ref, row_refs, chunk_refs, h_ref = refs
        n_ref = den_ref = None
    else:
        q_ref, k_ref, v_ref, c_ref, n_ref, row_refs, chunk_refs, h_ref, den_ref = refs
    row_names, chunk_names = (ROW_VECTORS_T, CHUNK_VECTORS_T) if transpose else (
        ROW_VECTORS, CHUNK_VECTORS)
    vt, qt, c, z = (lax.axis_index(n) for n in ("v", "q", "c", "bh"))
    wg = lax.axis_index("wg")
    b, h = idiv(z, H), irem(z, H)
    K = q_ref.shape[-1]
    nk = K // SLICE
    dtype = q_ref.dtype
    cta_rows = COMPUTE_WGS * ROWS_PER_WG
    vs = pl.ds(vt * block_v, block_v)
    chunk0 = c * chunk_size
    # Tiles [j0, j1) reach this CTA's rows (all warpgroups see all of them): up to the diagonal
    # of its last row, or transposed from the diagonal of its first row to the chunk's end.
    if transpose:
        j0, j1 = idiv(qt * cta_rows, block_kv), chunk_size // block_kv
    else:
        j0, j1 = 0, idiv((qt + 1) * cta_rows + block_kv - 1, block_kv)
    state = c + 1 if transpose else c   # dC_{c+1}: the cotangent of the state leaving chunk c

    def body(q_smem, k_smem, vc_smem, c_smem, vecs, chunk_vecs, n_smem, p_smem, bars):
        # C slices and v tiles share slots and barriers; fp16 inputs need bf16 slots for C.
        c_smem = vc_smem if c_smem is None else c_smem
        in_bars, k_loaded, k_free, vc_loaded, vc_free, done = bars

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch_k(j, slot):
                rows = pl.ds(chunk0 + j * block_kv, block_kv)
                for u in range(nk):
                    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, pl.ds(u * SLICE, SLICE)],
                                            k_smem.at[slot, u], k_loaded.at[slot])

            def fetch_vc(step, slot):
                @pl.when(step < nk)
                def _():
                    plgpu.copy_gmem_to_smem(
                        c_ref.at[b, h, state, pl.ds(step * SLICE, SLICE), vs], c_smem.at[slot],
                        vc_loaded.at[slot])

                @pl.when(step >= nk)
                def _():
                    j = j0 + step - nk
                    plgpu.copy_gmem_to_smem(
                        v_ref.at[b, pl.ds(chunk0 + j * block_kv, block_kv), h, vs],
                        vc_smem.at[slot], vc_loaded.at[slot])

            @pl.loop(0, nk + j1 - j0)
            def _(step):
                slot = irem(step, 2)

                @pl.when(step >= 2)
                def _():
                    plgpu.barrier_wait(vc_free.at[slot])

                fetch_vc(step, slot)
                i = step - nk   # the i-th tile of this CTA; slots count from j0

                @pl.when(i >= 0)
                def _():
                    kslot = irem(i, 2)

                    @pl.when(i >= 2)
                    def _():
                        plgpu.barrier_wait(k_free.at[kslot])

                    fetch_k(j0 + i, kslot)

            if interpret:   # the hardware needs no wait for the last releases
                observe_releases(vc_free, nk + j1 - j0, 2)
                observe_releases(k_free, j1 - j0, 2)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            r0 = qt * cta_rows + wg * ROWS_PER_WG                    # first row in the chunk
            q_rows = pl.ds(chunk0 + r0, ROWS_PER_WG)
            my_q, my_vecs = q_smem.at[wg], {n: vecs[n].at[wg] for n in vecs}
            my_chunk = {n: chunk_vecs[n].at[wg] for n in chunk_names}
            copies = [(q_ref.at[b, q_rows, h, pl.ds(u * SLICE, SLICE)], my_q.at[u])
                      for u in range(nk)]
            copies += [(row_refs[n].at[b, h, q_rows], my_vecs[n]) for n in row_names]
            copies += [(chunk_refs[n].at[b, h, pl.ds(chunk0, chunk_size)], my_chunk[n])
                       for n in chunk_names]
            if not transpose:
                copies += [(n_ref.at[b, h, c, pl.ds(u * SLICE, SLICE)], n_smem.at[wg, u])
                           for u in range(nk)]
            for idx, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, in_bars.at[wg, idx])
            for idx in range(len(copies)):
                plgpu.barrier_wait(in_bars.at[wg, idx])
            load = lambda name: row_vector(my_vecs[name])  # noqa: E731
            w_rows = load("w_state" if transpose else "w_inter")
            scratch = p_smem.at[wg] if interpret else None

            # 1. inter term (and q . n_c), one K slice at a time.
            acc = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG, block_v), F32), plgpu.Layout.WGMMA)
            qn = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG,), F32), ROWS)
            zero = c * 0   # a traced 0: wgmma operands cannot take static slot indices
            for u in range(nk):
                slot = zero + u % 2
                qu = plgpu.load(my_q.at[u], layout=plgpu.Layout.WGMMA).astype(F32)
                if not transpose:
                    nu = plgpu.load(n_smem.at[wg, u], layout=COLS)
                    qn = qn + (qu * lax.broadcast_in_dim(nu, qu.shape, [1])).sum(axis=1)
                a = rows_times(w_rows, qu).astype(STATE_DTYPE)
                plgpu.barrier_wait(vc_loaded.at[slot])
                acc = mma(acc, a, c_smem.at[slot], interpret=interpret,
                          scratch=scratch if interpret else None)
                plgpu.barrier_arrive(vc_free.at[slot])
            den = qn * w_rows

            # 2. the tiles on this warpgroup's side of its diagonal; the rest are only waited for.
            shape = (ROWS_PER_WG, block_kv)
            q_pos, kv_iota, rows_of, cols_of = tile_frame(r0, shape)
            if transpose:
                own0, own1 = idiv(r0, block_kv), j1
                bh_s, col_s = load("bh"), load("col")
            else:
                own0, own1 = 0, idiv(r0 + ROWS_PER_WG + block_kv - 1, block_kv)
                bh_q, row_q, start_q = load("bh"), load("row"), load("start")

            def weights(j, s):
                """The gated score tile P * S of tile j (registers, WGMMA layout)."""
                kv = pl.ds(j * block_kv, block_kv)
                col_vec = lambda name: plgpu.load(my_chunk[name].at[kv], layout=COLS)  # noqa
                kv_pos = j * block_kv + kv_iota
                if transpose:   # rows s, columns t: log P_ts, t >= s >= start_t
                    log_p = ((cols_of(col_vec("bh")) - rows_of(bh_s)) + cols_of(col_vec("row"))
                             + rows_of(col_s))
                    keep = (kv_pos >= q_pos) & (q_pos >= cols_of(col_vec("start")))
                    return jnp.exp2(jnp.where(keep, log_p, -jnp.inf) * LOG2E) * (
                        s * cols_of(col_vec("inv_n")))
                log_p = ((rows_of(bh_q) - cols_of(col_vec("bh"))) + rows_of(row_q)
                         + cols_of(col_vec("col")))
                keep = (kv_pos <= q_pos) & (kv_pos >= rows_of(start_q))
                return jnp.exp2(jnp.where(keep, log_p, -jnp.inf) * LOG2E) * s

            def wait_only(j):
                kslot, vslot = irem(j - j0, 2), irem(j - j0 + nk, 2)
                plgpu.barrier_wait(k_loaded.at[kslot])
                plgpu.barrier_arrive(k_free.at[kslot])
                plgpu.barrier_wait(vc_loaded.at[vslot])
                plgpu.barrier_arrive(vc_free.at[vslot])

            if transpose:
                pl.loop(j0, own0)(wait_only)

            def step(j, carry):
                acc, den = carry
                kslot, vslot = irem(j - j0, 2), irem(j - j0 + nk, 2)
                plgpu.barrier_wait(k_loaded.at[kslot])

                def scores(acc_ref):
                    for u in range(nk):
                        plgpu.wgmma(acc_ref, my_q.at[u], k_smem.at[kslot, u].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC(shape, F32))
                plgpu.barrier_arrive(k_free.at[kslot])
                p = weights(j, s)
                if not transpose:
                    den = den + p.sum(axis=1)
                plgpu.barrier_wait(vc_loaded.at[vslot])
                acc = mma(acc, p.astype(dtype), vc_smem.at[vslot], interpret=interpret,
                          scratch=scratch)
                plgpu.barrier_arrive(vc_free.at[vslot])
                return acc, den

            acc, den = lax.fori_loop(own0, own1, step, (acc, den))
            if not transpose:
                pl.loop(own1, j1)(wait_only)

            if normalize:
                inv = 1.0 / (jnp.maximum(jnp.abs(den), load("floor")) + eps)
                acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])

            # 3. Both warpgroups are done with the slots: stage h in slot wg.
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            out = vc_smem.at[wg]
            out[...] = acc.astype(dtype)
            if not transpose:
                my_vecs["floor"][...] = den
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, h_ref.at[b, q_rows, h, vs])

            if not transpose:
                @pl.when(vt == 0)
                def _():
                    plgpu.copy_smem_to_gmem(my_vecs["floor"], den_ref.at[b, h, q_rows])

            plgpu.wait_smem_to_gmem(0)

    n_in = (nk if transpose else 2 * nk) + len(row_names) + len(chunk_names)
    pl.run_scoped(
        body,
        smem((COMPUTE_WGS, nk, ROWS_PER_WG, SLICE), dtype),
        smem((2, nk, block_kv, SLICE), dtype),
        smem((2, block_kv, block_v), dtype),
        None if jnp.dtype(dtype) == STATE_DTYPE else smem((2, SLICE, block_v), STATE_DTYPE),
        *vector_scratch(row_names, chunk_names, chunk_size),
        None if transpose else plgpu.SMEM((COMPUTE_WGS, nk, SLICE), F32),
        smem((COMPUTE_WGS, ROWS_PER_WG, block_kv), dtype) if interpret else None,
        (plgpu.Barrier(num_barriers=(COMPUTE_WGS, n_in)), *ring_barriers(nk),
         *ring_barriers(1), plgpu.Barrier(num_arrivals=COMPUTE_WGS)),
        collective_axes="wg")


def _launch(inputs, out_type, *, T, H, V, chunk_size, block_v, transpose, name, **kw):
    kernel = functools.partial(_output_kernel, chunk_size=chunk_size, block_kv=KV_TILE,
                               block_v=block_v, H=H, transpose=transpose, **kw)
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(V // block_v, chunk_size // (COMPUTE_WGS * ROWS_PER_WG), T // chunk_size,
              inputs[0].shape[0] * H),
        grid_names=("v", "q", "c", "bh"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        interpret=interpret_params(kw["interpret"]),
        kernel_name=name,
    )(*inputs)


def chunk_output(q, k, v, c_states, n_states, rows, chunk, *, chunk_size, normalize, eps,
                 block_v=None, interpret=False):
    """h (B, T, H, V) in v's dtype and den (B, H, T) float32.

    q, k: (B, T, H, K), v: (B, T, H, V) (bf16/fp16, K and V multiples of 64, L a multiple of
    128); c_states (B, H, NC+1, K, V) in STATE_DTYPE, n_states (B, H, NC+1, K) float32;
    rows: dict of (B, H, T) vectors `ROW_VECTORS`; chunk: dict of `CHUNK_VECTORS`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    return _launch(
        (q, k, v, c_states, n_states, {n: rows[n] for n in ROW_VECTORS},
         {n: chunk[n] for n in CHUNK_VECTORS}),
        (jax.ShapeDtypeStruct((B, T, H, V), v.dtype), jax.ShapeDtypeStruct((B, H, T), F32)),
        T=T, H=H, V=V, chunk_size=chunk_size, block_v=block_v or min(V, 256), transpose=False,
        name="mlstm_fwd_output", normalize=normalize, eps=eps, interpret=interpret)


def chunk_dv(q, k, dh, dc_states, rows, chunk, *, chunk_size, block_v=None, interpret=False):
    """dv (B, T, H, V) in dh's dtype: the output kernel transposed (rows are keys s),
        dv_s = w_state_s k_s dC_{c+1} + sum_{t >= s >= start_t} (k_s . q_t) P_ts inv_n_t dh_t.

    q, k: (B, T, H, K), dh: (B, T, H, V) (as in `chunk_output`); dc_states (B, H, NC+1, K, V) in
    STATE_DTYPE (index c+1: the cotangent of the state leaving chunk c); rows: dict of (B, H, T)
    vectors `ROW_VECTORS_T`; chunk: dict of `CHUNK_VECTORS_T`.
    """
    B, T, H, K = q.shape
    V = dh.shape[-1]
    return _launch(
        (k, q, dh, dc_states, {n: rows[n] for n in ROW_VECTORS_T},
         {n: chunk[n] for n in CHUNK_VECTORS_T}),
        jax.ShapeDtypeStruct((B, T, H, V), dh.dtype),
        T=T, H=H, V=V, chunk_size=chunk_size, block_v=block_v or min(V, 256), transpose=True,
        name="mlstm_bwd_dv", normalize=False, eps=0.0, interpret=interpret)
