"""TFLA backward intra-chunk kernels (Pallas-Triton): dq, dk, dv.

With the stabiliser held constant, per (b, h) and chunk c (docs/kernels.md):
    dnum_t = inv_n_t dh_t,   dS_ts = dnum_t . v_s + dden_t,   dA = dS * P,   S = (q k^T) * P
    dq_t = sum_s dA_ts k_s + w_inter_t (C_c dnum_t + dden_t n_c)
    dk_s = sum_t dA_ts q_t + w_state_s (dC_{c+1} v_s + dn_{c+1})
    dv_s = sum_t S_ts dnum_t + w_state_s dC_{c+1}^T k_s
(P, w_inter include the query scale; dC, dn come from `states.state_grads`). The dq and dk
kernels also return the row dots the gate gradients are made of, split so that no two large
terms cancel (docs/math.md): q . dq and k . dk without the diagonal term dA_tt (q_t . k_t) (the
tile loops mask s < t strictly and pick dh_t . v_t off the diagonal of their dh v^T tiles; the
diagonal dA_tt = (inv_n_t dh_t . v_t + dden_t) P_tt is added afterwards), and the chunk-state part
of k . dk.
Gate vectors travel as dicts of (B, H, T) rows: one BlockSpec per dict entry.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tfla_jax import gates
from tfla_jax.backends.triton.common import (F32, NN, NT, idiv, irem, out_struct, params,
                                             precision, state_dtype)


def _dq_kernel(q_ref, k_ref, v_ref, dh_ref, rows, chunk, c_ref, n_ref, dq_ref, qdq_ref, *,
               chunk_size, block_q, block_kv, block_v, precision, op_dtype):
    # q_ref [bq, bko]; k_ref [L, bko], v_ref [L, Vp] (this chunk); dh_ref [bq, Vp];
    # rows: bh, row, start, inv_n, dden, w_inter [bq]; chunk: bh, col [L];
    # c_ref [bko, Vp], n_ref [bko] (the state entering the chunk); out dq_ref [bq, bko], qdq_ref [bq].
    dtype = q_ref.dtype
    num_v = v_ref.shape[-1] // block_v
    tile = irem(pl.program_id(0), chunk_size // block_q)
    q_pos = tile * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    bh_q, row_q, start_q = rows["bh"][...], rows["row"][...], rows["start"][...]
    inv_n, dden = rows["inv_n"][...], rows["dden"][...]

    def kv_body(s, carry):
        dq, diag = carry
        kv = pl.ds(pl.multiple_of(s * block_kv, block_kv), block_kv)

        def v_body(vt, dh_v):
            cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
            return dh_v + lax.dot_general(dh_ref[:, cols], v_ref[kv, cols], NT,
                                          preferred_element_type=F32, precision=precision)

        dh_v = lax.fori_loop(0, num_v, v_body, jnp.zeros((block_q, block_kv), F32))
        kv_pos = s * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
        p = gates.masked_exp(
            gates.intra_log_weights(bh_q, row_q, chunk["bh"][kv], chunk["col"][kv]),
            gates.intra_mask(q_pos, kv_pos, start_q, strict=True))
        d_a = (dh_v * inv_n[:, None] + dden[:, None]) * p                   # [bq, bkv]
        diag = diag + jnp.sum(jnp.where(q_pos[:, None] == kv_pos[None, :], dh_v, 0.0), axis=1)
        return dq + lax.dot_general(d_a.astype(dtype), k_ref[kv, :], NN,
                                    preferred_element_type=F32, precision=precision), diag

    num_kv = idiv((tile + 1) * block_q + block_kv - 1, block_kv)
    dq, dh_v_diag = lax.fori_loop(0, num_kv, kv_body, (jnp.zeros(dq_ref.shape, F32),
                                                      jnp.zeros((block_q,), F32)))

    def inter_body(vt, acc):
        cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
        return acc + lax.dot_general(dh_ref[:, cols].astype(op_dtype),
                                     c_ref[:, cols].astype(op_dtype), NT,
                                     preferred_element_type=F32, precision=precision)

    dh_c = lax.fori_loop(0, num_v, inter_body, jnp.zeros(dq_ref.shape, F32))
    w = rows["w_inter"][...]
    dq = dq + w[:, None] * (inv_n[:, None] * dh_c + dden[:, None] * n_ref[...][None, :])
    qdq_ref[...] = jnp.sum(q_ref[...].astype(F32) * dq, axis=1)
    own = pl.ds(pl.multiple_of(tile * block_q, block_q), block_q)           # the diagonal
    d_diag = (dh_v_diag * inv_n + dden) * gates.diagonal_weight(row_q, chunk["col"][own])
    dq = dq + d_diag[:, None] * k_ref[own, :].astype(F32)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dk_kernel(k_ref, v_ref, q_ref, dh_ref, rows, chunk, dc_ref, dn_ref, dk_ref, kdk_off_ref,
               kdk_inter_ref, kdk_ref, *,
               chunk_size, block_q, block_kv, block_v, precision, op_dtype):
    # k_ref [bkv, bko], v_ref [bkv, Vp]; q_ref [L, bko], dh_ref [L, Vp] (this chunk);
    # rows: bh, col, w_state [bkv]; chunk: bh, row, start, inv_n, dden [L];
    # dc_ref [bko, Vp], dn_ref [bko] (cotangent of the state leaving the chunk);
    # out dk_ref [bkv, bko]; row dots k . dk [bkv]: kdk_off_ref of the intra-chunk part without
    # the diagonal, kdk_inter_ref of the chunk-state part, kdk_ref of all of dk.
    dtype = k_ref.dtype
    num_v = v_ref.shape[-1] // block_v
    tile = irem(pl.program_id(0), chunk_size // block_kv)
    kv_pos = tile * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    bh_kv, col_kv = rows["bh"][...], rows["col"][...]

    def q_body(t, carry):
        dk, diag = carry
        qr = pl.ds(pl.multiple_of(t * block_q, block_q), block_q)

        def v_body(vt, v_dh):
            cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
            return v_dh + lax.dot_general(v_ref[:, cols], dh_ref[qr, cols], NT,
                                          preferred_element_type=F32, precision=precision)

        v_dh = lax.fori_loop(0, num_v, v_body, jnp.zeros((block_kv, block_q), F32))
        q_pos = t * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        p_t = gates.masked_exp(
            gates.intra_log_weights_t(chunk["bh"][qr], chunk["row"][qr], bh_kv, col_kv),
            gates.intra_mask_t(q_pos, kv_pos, chunk["start"][qr], strict=True))
        d_at = (v_dh * chunk["inv_n"][qr][None, :] + chunk["dden"][qr][None, :]) * p_t
        diag = diag + jnp.sum(jnp.where(kv_pos[:, None] == q_pos[None, :], v_dh, 0.0), axis=1)
        return dk + lax.dot_general(d_at.astype(dtype), q_ref[qr, :], NN,
                                    preferred_element_type=F32, precision=precision), diag

    first = idiv(tile * block_kv, block_q)
    dk, v_dh_diag = lax.fori_loop(first, chunk_size // block_q, q_body,
                                  (jnp.zeros(dk_ref.shape, F32), jnp.zeros((block_kv,), F32)))

    def inter_body(vt, acc):
        cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
        return acc + lax.dot_general(v_ref[:, cols].astype(op_dtype),
                                     dc_ref[:, cols].astype(op_dtype), NT,
                                     preferred_element_type=F32, precision=precision)

    inter = lax.fori_loop(0, num_v, inter_body, jnp.zeros(dk_ref.shape, F32))
    inter = rows["w_state"][...][:, None] * (inter + dn_ref[...][None, :])
    kf = k_ref[...].astype(F32)
    kdk_off_ref[...] = jnp.sum(kf * dk, axis=1)
    kdk_inter_ref[...] = jnp.sum(kf * inter, axis=1)
    own = pl.ds(pl.multiple_of(tile * block_kv, block_kv), block_kv)        # the diagonal
    d_diag = ((v_dh_diag * chunk["inv_n"][own] + chunk["dden"][own])
              * gates.diagonal_weight(chunk["row"][own], col_kv))
    dk = dk + inter + d_diag[:, None] * q_ref[own, :].astype(F32)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    kdk_ref[...] = jnp.sum(kf * dk, axis=1)


def _dv_kernel(k_ref, q_ref, dh_ref, rows, chunk, dc_ref, dv_ref, *, chunk_size, block_q,
               block_kv, block_k, precision, op_dtype):
    # k_ref [bkv, Kp]; q_ref [L, Kp], dh_ref [L, bvo] (this chunk); rows: bh, col, w_state
    # [bkv]; chunk: bh, row, start, inv_n [L]; dc_ref [Kp, bvo] (cotangent of the state leaving
    # the chunk); out dv_ref [bkv, bvo].
    dtype = k_ref.dtype
    num_k = k_ref.shape[-1] // block_k
    tile = irem(pl.program_id(0), chunk_size // block_kv)
    kv_pos = tile * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    bh_kv, col_kv = rows["bh"][...], rows["col"][...]

    def q_body(t, dv):
        qr = pl.ds(pl.multiple_of(t * block_q, block_q), block_q)

        def k_body(kt, s_t):
            cols = pl.ds(pl.multiple_of(kt * block_k, block_k), block_k)
            return s_t + lax.dot_general(k_ref[:, cols], q_ref[qr, cols], NT,
                                         preferred_element_type=F32, precision=precision)

        s_t = lax.fori_loop(0, num_k, k_body, jnp.zeros((block_kv, block_q), F32))
        q_pos = t * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        p_t = gates.masked_exp(
            gates.intra_log_weights_t(chunk["bh"][qr], chunk["row"][qr], bh_kv, col_kv),
            gates.intra_mask_t(q_pos, kv_pos, chunk["start"][qr]))
        s_t = s_t * (p_t * chunk["inv_n"][qr][None, :])          # S^T dnum = (S^T inv_n) dh
        return dv + lax.dot_general(s_t.astype(dtype), dh_ref[qr, :], NN,
                                    preferred_element_type=F32, precision=precision)

    first = idiv(tile * block_kv, block_q)
    dv = lax.fori_loop(first, chunk_size // block_q, q_body, jnp.zeros(dv_ref.shape, F32))

    def inter_body(kt, acc):
        cols = pl.ds(pl.multiple_of(kt * block_k, block_k), block_k)
        return acc + lax.dot_general(k_ref[:, cols].astype(op_dtype),
                                     dc_ref[cols, :].astype(op_dtype), NN,
                                     preferred_element_type=F32, precision=precision)

    inter = lax.fori_loop(0, num_k, inter_body, jnp.zeros(dv_ref.shape, F32))
    dv_ref[...] = (dv + rows["w_state"][...][:, None] * inter).astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Layout: q, k, v, dh (B, T, H, D) with padded head dims; gate rows
# (B, H, T); states (B, H, NC+1, K, V). Grid (row tile j, feature tile, b, h).
# ----------------------------------------------------------------------------------------------

def _row_specs(names, block):
    return {n: pl.BlockSpec((None, None, block), lambda j, d, b, h: (b, h, j)) for n in names}


def _chunk_specs(names, chunk_of, L):
    return {n: pl.BlockSpec((None, None, L), lambda j, d, b, h: (b, h, chunk_of(j)))
            for n in names}


def _pick(gt_rows, names):
    return {n: gt_rows[n] for n in names}


def intra_dq(q, k, v, dh, gt_rows, c_states, n_states, *, config, interpret):
    """dq (B, T, H, K) in q's dtype and partial row dots q . dq without the diagonal term
    (B, H, K/bko, T) float32.

    gt_rows: dict of (B, H, T) rows: bh, row, col, start, inv_n, dden, w_inter, w_state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    L, bq, bkv, bko = (config.chunk_size, config.bwd_block_q, config.bwd_block_kv,
                       config.bwd_block_k_out)
    chunk_of = lambda j: idiv(j, L // bq)  # noqa: E731
    row_names, chunk_names = ("bh", "row", "start", "inv_n", "dden", "w_inter"), ("bh", "col")
    kernel = functools.partial(_dq_kernel, chunk_size=L, block_q=bq, block_kv=bkv,
                               block_v=config.bwd_block_v, precision=precision(q.dtype),
                               op_dtype=state_dtype(q.dtype))
    return pl.pallas_call(
        kernel,
        grid=(T // bq, K // bko, B, H),
        in_specs=[
            pl.BlockSpec((None, bq, None, bko), lambda j, d, b, h: (b, j, h, d)),
            pl.BlockSpec((None, L, None, bko), lambda j, d, b, h: (b, chunk_of(j), h, d)),
            pl.BlockSpec((None, L, None, V), lambda j, d, b, h: (b, chunk_of(j), h, 0)),
            pl.BlockSpec((None, bq, None, V), lambda j, d, b, h: (b, j, h, 0)),
            _row_specs(row_names, bq), _chunk_specs(chunk_names, chunk_of, L),
            pl.BlockSpec((None, None, None, bko, V), lambda j, d, b, h: (b, h, chunk_of(j), d, 0)),
            pl.BlockSpec((None, None, None, bko), lambda j, d, b, h: (b, h, chunk_of(j), d)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, bko), lambda j, d, b, h: (b, j, h, d)),
            pl.BlockSpec((None, None, None, bq), lambda j, d, b, h: (b, h, d, j)),
        ],
        out_shape=[out_struct(q.shape, q.dtype, q), out_struct((B, H, K // bko, T), F32, q)],
        compiler_params=params(config.bwd_num_warps, config.bwd_num_stages),
        interpret=interpret,
        name="mlstm_bwd_dq",
    )(q, k, v, dh, _pick(gt_rows, row_names), _pick(gt_rows, chunk_names), c_states, n_states)


def intra_dk(q, k, v, dh, gt_rows, dc_states, dn_states, *, config, interpret):
    """dk (B, T, H, K) in k's dtype and partial row dots (B, H, K/bko, T) float32 of k with: the
    intra-chunk part of dk without the diagonal, its chunk-state part, all of dk."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    L, bq, bkv, bko = (config.chunk_size, config.bwd_block_q, config.bwd_block_kv,
                       config.bwd_block_k_out)
    chunk_of = lambda j: idiv(j, L // bkv)  # noqa: E731
    row_names = ("bh", "col", "w_state")
    chunk_names = ("bh", "row", "start", "inv_n", "dden")
    kernel = functools.partial(_dk_kernel, chunk_size=L, block_q=bq, block_kv=bkv,
                               block_v=config.bwd_block_v, precision=precision(k.dtype),
                               op_dtype=state_dtype(k.dtype))
    return pl.pallas_call(
        kernel,
        grid=(T // bkv, K // bko, B, H),
        in_specs=[
            pl.BlockSpec((None, bkv, None, bko), lambda j, d, b, h: (b, j, h, d)),
            pl.BlockSpec((None, bkv, None, V), lambda j, d, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, L, None, bko), lambda j, d, b, h: (b, chunk_of(j), h, d)),
            pl.BlockSpec((None, L, None, V), lambda j, d, b, h: (b, chunk_of(j), h, 0)),
            _row_specs(row_names, bkv), _chunk_specs(chunk_names, chunk_of, L),
            pl.BlockSpec((None, None, None, bko, V),
                         lambda j, d, b, h: (b, h, chunk_of(j) + 1, d, 0)),
            pl.BlockSpec((None, None, None, bko), lambda j, d, b, h: (b, h, chunk_of(j) + 1, d)),
        ],
        out_specs=[
            pl.BlockSpec((None, bkv, None, bko), lambda j, d, b, h: (b, j, h, d)),
            *[pl.BlockSpec((None, None, None, bkv), lambda j, d, b, h: (b, h, d, j))] * 3,
        ],
        out_shape=[out_struct(k.shape, k.dtype, k),
                   *[out_struct((B, H, K // bko, T), F32, k)] * 3],
        compiler_params=params(config.bwd_num_warps, config.bwd_num_stages),
        interpret=interpret,
        name="mlstm_bwd_dk",
    )(k, v, q, dh, _pick(gt_rows, row_names), _pick(gt_rows, chunk_names), dc_states, dn_states)


def intra_dv(q, k, v, dh, gt_rows, dc_states, *, config, interpret):
    """dv (B, T, H, V) in v's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    L, bq, bkv, bvo = (config.chunk_size, config.dv_block_q, config.dv_block_kv,
                       config.dv_block_v_out)
    chunk_of = lambda j: idiv(j, L // bkv)  # noqa: E731
    row_names, chunk_names = ("bh", "col", "w_state"), ("bh", "row", "start", "inv_n")
    kernel = functools.partial(_dv_kernel, chunk_size=L, block_q=bq, block_kv=bkv,
                               block_k=config.dv_block_k, precision=precision(k.dtype),
                               op_dtype=state_dtype(k.dtype))
    return pl.pallas_call(
        kernel,
        grid=(T // bkv, V // bvo, B, H),
        in_specs=[
            pl.BlockSpec((None, bkv, None, K), lambda j, d, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, L, None, K), lambda j, d, b, h: (b, chunk_of(j), h, 0)),
            pl.BlockSpec((None, L, None, bvo), lambda j, d, b, h: (b, chunk_of(j), h, d)),
            _row_specs(row_names, bkv), _chunk_specs(chunk_names, chunk_of, L),
            pl.BlockSpec((None, None, None, K, bvo),
                         lambda j, d, b, h: (b, h, chunk_of(j) + 1, 0, d)),
        ],
        out_specs=pl.BlockSpec((None, bkv, None, bvo), lambda j, d, b, h: (b, j, h, d)),
        out_shape=out_struct(v.shape, v.dtype, v),
        compiler_params=params(config.dv_num_warps, config.dv_num_stages),
        interpret=interpret,
        name="mlstm_bwd_dv",
    )(k, q, dh, _pick(gt_rows, row_names), _pick(gt_rows, chunk_names), dc_states)
