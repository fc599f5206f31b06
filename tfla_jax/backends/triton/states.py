"""The sequential chunk-state kernels (Pallas-Triton), shared by forward and backward.

chunk_states: C_{c+1} = decay_c C_c + (w_state k_c)^T v_c, n likewise, over the chunks; the
  forward's states for the output kernel and the backward's recompute are this one kernel.
state_grads:  dC_c = decay_c dC_{c+1} + (wq q_c)^T dh_c, dn_c = decay_c dn_{c+1} + sum wd q_c,
  in reverse, with the carried-state terms decay_c <C_c, dC_{c+1}> of the forget-gate gradient.
One program owns one (K tile x V tile) of the state of one (b, h) and runs over all chunks.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tfla_jax.backends.triton.common import (F32, TN, idiv, irem, out_struct, params, precision,
                                             state_dtype)


def _chunk_states_kernel(k_ref, v_ref, w_ref, decay_ref, c0_ref, n0_ref, c_ref, n_ref,
                         c_last_ref, *, num_chunks, chunk_size, block_t, precision):
    # k_ref [T, bk], v_ref [T, bv], w_ref [T], decay_ref [NC], c0_ref [bk, bv], n0_ref [bk];
    # out c_ref [NC+1, bk, bv] (state dtype), n_ref [NC+1, bk] (V tile 0 writes it),
    # c_last_ref [bk, bv] float32 (the final state).
    # One flat loop over all T/block_t sub-blocks (not chunks x sub-blocks) so that Triton
    # pipelines the k/v loads across chunk boundaries; a chunk's first sub-block does the
    # boundary work (store the state entering the chunk, apply the decay).
    n_sub = chunk_size // block_t
    write_n = pl.program_id(1) == 0

    def store(idx, c, n):
        c_ref[idx] = c.astype(c_ref.dtype)

        @pl.when(write_n)
        def _():
            n_ref[idx] = n

    def body(j, carry):
        c, n = carry
        chunk = idiv(j, n_sub)
        first = irem(j, n_sub) == 0

        @pl.when(first)
        def _():
            store(chunk, c, n)

        d = jnp.where(first, decay_ref[chunk], 1.0)
        rows = pl.ds(pl.multiple_of(j * block_t, block_t), block_t)
        kk = k_ref[rows, :]                                                   # [bt, bk]
        kw = kk.astype(F32) * w_ref[rows][:, None]
        c = c * d + lax.dot_general(kw.astype(kk.dtype), v_ref[rows, :], TN,
                                    preferred_element_type=F32, precision=precision)
        return c, n * d + jnp.sum(kw, axis=0)

    c, n = lax.fori_loop(0, num_chunks * n_sub, body,
                         (c0_ref[...].astype(F32), n0_ref[...].astype(F32)))
    store(num_chunks, c, n)
    c_last_ref[...] = c


def chunk_states(k, v, w_state, decay, c0, n0, *, config, interpret):
    """States entering every chunk and the final one.

    k: (B, T, H, K), v: (B, T, H, V) (K, V multiples of the tiles); w_state: (B, H, T);
    decay: (B, H, NC); c0 (B, H, K, V), n0 (B, H, K) float32.
    Returns C (B, H, NC+1, K, V) in `state_dtype`, n (B, H, NC+1, K) float32 and the final C
    (B, H, K, V) float32.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    L = config.chunk_size
    NC = T // L
    bk, bv, bt = config.states_block_k, config.states_block_v, config.states_block_t
    kernel = functools.partial(_chunk_states_kernel, num_chunks=NC, chunk_size=L, block_t=bt,
                               precision=precision(k.dtype))
    tile = pl.BlockSpec((None, None, bk, bv), lambda kt, vt, b, h: (b, h, kt, vt))
    return pl.pallas_call(
        kernel,
        grid=(K // bk, V // bv, B, H),
        in_specs=[
            pl.BlockSpec((None, T, None, bk), lambda kt, vt, b, h: (b, 0, h, kt)),
            pl.BlockSpec((None, T, None, bv), lambda kt, vt, b, h: (b, 0, h, vt)),
            pl.BlockSpec((None, None, T), lambda kt, vt, b, h: (b, h, 0)),
            pl.BlockSpec((None, None, NC), lambda kt, vt, b, h: (b, h, 0)),
            tile,
            pl.BlockSpec((None, None, bk), lambda kt, vt, b, h: (b, h, kt)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, NC + 1, bk, bv), lambda kt, vt, b, h: (b, h, 0, kt, vt)),
            pl.BlockSpec((None, None, NC + 1, bk), lambda kt, vt, b, h: (b, h, 0, kt)),
            tile,
        ],
        out_shape=[out_struct((B, H, NC + 1, K, V), state_dtype(k.dtype), k),
                   out_struct((B, H, NC + 1, K), F32, k),
                   out_struct((B, H, K, V), F32, k)],
        compiler_params=params(config.states_num_warps, config.states_num_stages),
        interpret=interpret,
        name="mlstm_chunk_states",
    )(k, v, w_state, decay, c0, n0)


def _state_grads_kernel(q_ref, dh_ref, wq_ref, wd_ref, decay_ref, c_ref, dct_ref, dnt_ref,
                        dc_ref, dn_ref, dc_first_ref, zc_ref, *, chunk_size, block_t, num_chunks,
                        op_dtype, precision):
    # q_ref [T, bk], dh_ref [T, bv], wq_ref / wd_ref [T] (w_inter inv_n, w_inter dden),
    # decay_ref [NC], c_ref [NC+1, bk, bv] (the states), dct_ref [bk, bv], dnt_ref [bk];
    # out dc_ref [NC+1, bk, bv] (state dtype), dn_ref [NC+1, bk] (V tile 0 writes it),
    # dc_first_ref [bk, bv] (dC_0, float32), zc_ref [NC] (this tile's decay_c <C_c, dC_{c+1}>,
    # from the float32 dC: the carried-state part of the forget-gate gradient).
    write_n = pl.program_id(1) == 0
    dc = dct_ref[...].astype(F32)
    dn = dnt_ref[...].astype(F32)
    dc_ref[num_chunks] = dc.astype(dc_ref.dtype)

    @pl.when(write_n)
    def _():
        dn_ref[num_chunks] = dn

    def body(s, carry):
        t = num_chunks - 1 - s
        d = decay_ref[t]
        zc_ref[t] = d * jnp.sum(c_ref[t].astype(F32) * carry[0])
        dc, dn = carry[0] * d, carry[1] * d

        def rows_body(j, carry):
            dc, dn = carry
            rows = pl.ds(pl.multiple_of(t * chunk_size + j * block_t, block_t), block_t)
            qf = q_ref[rows, :].astype(F32)
            dc = dc + lax.dot_general((qf * wq_ref[rows][:, None]).astype(op_dtype),
                                      dh_ref[rows, :].astype(op_dtype), TN,
                                      preferred_element_type=F32, precision=precision)
            return dc, dn + jnp.sum(qf * wd_ref[rows][:, None], axis=0)

        dc, dn = lax.fori_loop(0, chunk_size // block_t, rows_body, (dc, dn))
        dc_ref[t] = dc.astype(dc_ref.dtype)

        @pl.when(write_n)
        def _():
            dn_ref[t] = dn

        return dc, dn

    dc, _ = lax.fori_loop(0, num_chunks, body, (dc, dn))
    dc_first_ref[...] = dc


def state_grads(q, dh, wq, wd, decay, c_states, dc_T, dn_T, *, config, interpret):
    """Cotangents of every chunk-boundary state.

    q: (B, T, H, K), dh: (B, T, H, V); wq, wd: (B, H, T); decay: (B, H, NC);
    c_states: (B, H, NC+1, K, V); dc_T (B, H, K, V), dn_T (B, H, K) float32.
    Returns dC (B, H, NC+1, K, V) in `state_dtype`, dn (B, H, NC+1, K) float32, dC_0
    (B, H, K, V) float32 and per (K tile, V tile) the partial decay_c <C_c, dC_{c+1}>
    (B, H, K/bk, V/bv, NC) float32.
    """
    B, T, H, K = q.shape
    V = dh.shape[-1]
    L = config.chunk_size
    NC = T // L
    bk, bv, bt = config.states_block_k, config.states_block_v, config.states_block_t
    kernel = functools.partial(_state_grads_kernel, chunk_size=L, block_t=bt, num_chunks=NC,
                               op_dtype=state_dtype(q.dtype), precision=precision(q.dtype))
    tile = pl.BlockSpec((None, None, bk, bv), lambda kt, vt, b, h: (b, h, kt, vt))
    states = pl.BlockSpec((None, None, NC + 1, bk, bv), lambda kt, vt, b, h: (b, h, 0, kt, vt))
    rows = pl.BlockSpec((None, None, T), lambda kt, vt, b, h: (b, h, 0))
    return pl.pallas_call(
        kernel,
        grid=(K // bk, V // bv, B, H),
        in_specs=[
            pl.BlockSpec((None, T, None, bk), lambda kt, vt, b, h: (b, 0, h, kt)),
            pl.BlockSpec((None, T, None, bv), lambda kt, vt, b, h: (b, 0, h, vt)),
            rows, rows,
            pl.BlockSpec((None, None, NC), lambda kt, vt, b, h: (b, h, 0)),
            states, tile,
            pl.BlockSpec((None, None, bk), lambda kt, vt, b, h: (b, h, kt)),
        ],
        out_specs=[
            states,
            pl.BlockSpec((None, None, NC + 1, bk), lambda kt, vt, b, h: (b, h, 0, kt)),
            tile,
            pl.BlockSpec((None, None, None, None, NC), lambda kt, vt, b, h: (b, h, kt, vt, 0)),
        ],
        out_shape=[out_struct((B, H, NC + 1, K, V), state_dtype(q.dtype), q),
                   out_struct((B, H, NC + 1, K), F32, q),
                   out_struct((B, H, K, V), F32, q),
                   out_struct((B, H, K // bk, V // bv, NC), F32, q)],
        compiler_params=params(config.states_num_warps, config.states_num_stages),
        interpret=interpret,
        name="mlstm_state_grads",
    )(q, dh, wq, wd, decay, c_states, dc_T, dn_T)
