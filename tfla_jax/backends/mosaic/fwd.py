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
                                             interpret_params, mma, row_vector, rows_times,
                                             smem)

ROW_VECTORS = ("bh", "row", "start", "w_inter", "floor")
CHUNK_VECTORS = ("bh", "col")
SLICE = 64          # K slice width of every q / k operand
ROWS_PER_WG = 64    # query rows of one compute warpgroup
KV_TILE = 64        # rows of a kv tile (a freed v slot stages a warpgroup's h: same shape)
COMPUTE_WGS = 2


def _output_kernel(q_ref, k_ref, v_ref, c_ref, n_ref, row_refs, chunk_refs, h_ref, den_ref, *,
                   chunk_size, block_kv, block_v, H, normalize, eps, interpret):
    # q_ref, k_ref (B, T, H, K); v_ref (B, T, H, V); c_ref (B, H, NC+1, K, V) states;
    # n_ref (B, H, NC+1, K) float32; row_refs / chunk_refs: dicts of (B, H, T) vectors;
    # out h_ref (B, T, H, V), den_ref (B, H, T).
    vt, qt, c, z = (lax.axis_index(n) for n in ("v", "q", "c", "bh"))
    wg = lax.axis_index("wg")
    b, h = idiv(z, H), irem(z, H)
    K = q_ref.shape[-1]
    nk = K // SLICE
    dtype = q_ref.dtype
    cta_rows = COMPUTE_WGS * ROWS_PER_WG
    vs = pl.ds(vt * block_v, block_v)
    chunk0 = c * chunk_size
    # kv tiles up to the diagonal of the last row of this CTA (all warpgroups see all of them).
    n_kv = idiv((qt + 1) * cta_rows + block_kv - 1, block_kv)

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
                    plgpu.copy_gmem_to_smem(c_ref.at[b, h, c, pl.ds(step * SLICE, SLICE), vs],
                                            c_smem.at[slot], vc_loaded.at[slot])

                @pl.when(step >= nk)
                def _():
                    j = step - nk
                    plgpu.copy_gmem_to_smem(
                        v_ref.at[b, pl.ds(chunk0 + j * block_kv, block_kv), h, vs],
                        vc_smem.at[slot], vc_loaded.at[slot])

            @pl.loop(0, nk + n_kv)
            def _(step):
                slot = irem(step, 2)

                @pl.when(step >= 2)
                def _():
                    plgpu.barrier_wait(vc_free.at[slot])

                fetch_vc(step, slot)
                j = step - nk

                @pl.when(j >= 0)
                def _():
                    kslot = irem(j, 2)

                    @pl.when(j >= 2)
                    def _():
                        plgpu.barrier_wait(k_free.at[kslot])

                    fetch_k(j, kslot)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            r0 = qt * cta_rows + wg * ROWS_PER_WG                    # first row in the chunk
            q_rows = pl.ds(chunk0 + r0, ROWS_PER_WG)
            my_q, my_vecs = q_smem.at[wg], {n: vecs[n].at[wg] for n in vecs}
            my_chunk = {n: chunk_vecs[n].at[wg] for n in CHUNK_VECTORS}
            copies = [(q_ref.at[b, q_rows, h, pl.ds(u * SLICE, SLICE)], my_q.at[u])
                      for u in range(nk)]
            copies += [(row_refs[n].at[b, h, q_rows], my_vecs[n]) for n in ROW_VECTORS]
            copies += [(chunk_refs[n].at[b, h, pl.ds(chunk0, chunk_size)], my_chunk[n])
                       for n in CHUNK_VECTORS]
            copies += [(n_ref.at[b, h, c, pl.ds(u * SLICE, SLICE)], n_smem.at[wg, u]) for u in range(nk)]
            for idx, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, in_bars.at[wg, idx])
            for idx in range(len(copies)):
                plgpu.barrier_wait(in_bars.at[wg, idx])
            load = lambda name: row_vector(my_vecs[name])  # noqa: E731
            w_inter = load("w_inter")
            scratch = p_smem.at[wg] if interpret else None

            # 1. inter term and q . n_c, one K slice at a time.
            acc = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG, block_v), F32), plgpu.Layout.WGMMA)
            qn = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG,), F32), ROWS)
            zero = c * 0   # a traced 0: wgmma operands cannot take static slot indices
            for u in range(nk):
                slot = zero + u % 2
                qu = plgpu.load(my_q.at[u], layout=plgpu.Layout.WGMMA).astype(F32)
                nu = plgpu.load(n_smem.at[wg, u], layout=COLS)
                qn = qn + (qu * lax.broadcast_in_dim(nu, qu.shape, [1])).sum(axis=1)
                a = rows_times(w_inter, qu).astype(STATE_DTYPE)
                plgpu.barrier_wait(vc_loaded.at[slot])
                acc = mma(acc, a, c_smem.at[slot], interpret=interpret,
                          scratch=scratch if interpret else None)
                plgpu.barrier_arrive(vc_free.at[slot])
            den = qn * w_inter

            # 2. kv tiles up to this warpgroup's diagonal; the rest are only waited for.
            bh_q, row_q, start_q = load("bh"), load("row"), load("start")
            shape = (ROWS_PER_WG, block_kv)
            q_pos = r0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
            kv_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            rows_of = lambda x: lax.broadcast_in_dim(x, shape, [0])  # noqa: E731
            cols_of = lambda x: lax.broadcast_in_dim(x, shape, [1])  # noqa: E731
            n_own = idiv(r0 + ROWS_PER_WG + block_kv - 1, block_kv)

            def step(j, carry):
                acc, den = carry
                kslot, vslot = irem(j, 2), irem(j + nk, 2)
                plgpu.barrier_wait(k_loaded.at[kslot])

                def scores(acc_ref):
                    for u in range(nk):
                        plgpu.wgmma(acc_ref, my_q.at[u], k_smem.at[kslot, u].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC(shape, F32))
                plgpu.barrier_arrive(k_free.at[kslot])
                kv = pl.ds(j * block_kv, block_kv)
                bh_k = plgpu.load(my_chunk["bh"].at[kv], layout=COLS)
                col_k = plgpu.load(my_chunk["col"].at[kv], layout=COLS)
                kv_pos = j * block_kv + kv_iota
                log_p = (rows_of(bh_q) - cols_of(bh_k)) + rows_of(row_q) + cols_of(col_k)
                keep = (kv_pos <= q_pos) & (kv_pos >= rows_of(start_q))
                p = jnp.exp2(jnp.where(keep, log_p, -jnp.inf) * LOG2E) * s
                den = den + p.sum(axis=1)
                plgpu.barrier_wait(vc_loaded.at[vslot])
                acc = mma(acc, p.astype(dtype), vc_smem.at[vslot], interpret=interpret,
                          scratch=scratch)
                plgpu.barrier_arrive(vc_free.at[vslot])
                return acc, den

            acc, den = lax.fori_loop(0, n_own, step, (acc, den))

            @pl.loop(n_own, n_kv)
            def _(j):
                kslot, vslot = irem(j, 2), irem(j + nk, 2)
                plgpu.barrier_wait(k_loaded.at[kslot])
                plgpu.barrier_arrive(k_free.at[kslot])
                plgpu.barrier_wait(vc_loaded.at[vslot])
                plgpu.barrier_arrive(vc_free.at[vslot])

            if normalize:
                inv = 1.0 / (jnp.maximum(jnp.abs(den), load("floor")) + eps)
                acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])

            # 3. Both warpgroups are done with the slots: stage h in slot wg.
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            out = vc_smem.at[wg]
            out[...] = acc.astype(dtype)
            my_vecs["floor"][...] = den
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, h_ref.at[b, q_rows, h, vs])

            @pl.when(vt == 0)
            def _():
                plgpu.copy_smem_to_gmem(my_vecs["floor"], den_ref.at[b, h, q_rows])

            plgpu.wait_smem_to_gmem(0)

    n_in = 2 * nk + len(ROW_VECTORS) + len(CHUNK_VECTORS)
    pl.run_scoped(
        body,
        smem((COMPUTE_WGS, nk, ROWS_PER_WG, SLICE), dtype),
        smem((2, nk, block_kv, SLICE), dtype),
        smem((2, block_kv, block_v), dtype),
        None if jnp.dtype(dtype) == STATE_DTYPE else smem((2, SLICE, block_v), STATE_DTYPE),
        {n: plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.int32 if n == "start" else F32)
         for n in ROW_VECTORS},
        {n: plgpu.SMEM((COMPUTE_WGS, chunk_size), F32) for n in CHUNK_VECTORS},
        plgpu.SMEM((COMPUTE_WGS, nk, SLICE), F32),
        smem((COMPUTE_WGS, ROWS_PER_WG, block_kv), dtype) if interpret else None,
        (plgpu.Barrier(num_barriers=(COMPUTE_WGS, n_in)),
         plgpu.Barrier(num_arrivals=nk, num_barriers=2),
         plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
         plgpu.Barrier(num_barriers=2),
         plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
         plgpu.Barrier(num_arrivals=COMPUTE_WGS)),
        collective_axes="wg")


def chunk_output(q, k, v, c_states, n_states, rows, chunk, *, chunk_size, normalize, eps,
                 block_v=None, interpret=False):
    """h (B, T, H, V) in v's dtype and den (B, H, T) float32.

    q, k: (B, T, H, K), v: (B, T, H, V) (bf16/fp16, K and V multiples of 64, L a multiple of
    128); c_states (B, H, NC+1, K, V) in STATE_DTYPE, n_states (B, H, NC+1, K) float32;
    rows: dict of (B, H, T) vectors `ROW_VECTORS`; chunk: dict of `CHUNK_VECTORS`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    block_v = block_v or min(V, 256)
    kernel = functools.partial(_output_kernel, chunk_size=chunk_size, block_kv=KV_TILE,
                               block_v=block_v, H=H, normalize=normalize, eps=eps,
                               interpret=interpret)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T, H, V), v.dtype),
                  jax.ShapeDtypeStruct((B, H, T), F32)),
        grid=(V // block_v, chunk_size // (COMPUTE_WGS * ROWS_PER_WG), T // chunk_size, B * H),
        grid_names=("v", "q", "c", "bh"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name="mlstm_fwd_output",
    )(q, k, v, c_states, n_states, {n: rows[n] for n in ROW_VECTORS},
      {n: chunk[n] for n in CHUNK_VECTORS})
