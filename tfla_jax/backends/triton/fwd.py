"""TFLA forward output kernel (Pallas-Triton): intra-chunk tiles plus the inter-chunk term.

Per (b, h), chunk c, query row tau (docs/kernels.md; gate vectors from `gates.chunk_gates`):
    num_tau = w_inter_tau q_tau C_c + sum_{s} (q_tau . k_s) P_{tau,s} v_s
    den_tau = w_inter_tau q_tau . n_c + sum_{s} (q_tau . k_s) P_{tau,s}
    h_tau   = num_tau / (max(|den_tau|, floor_tau) + eps)      (num_tau without normaliser)
with P from `gates.intra_log_weights` / `gates.intra_mask` (scale and stabiliser folded in).
One program: one V tile x one query tile of one chunk; a loop over kv tiles up to the diagonal
and, inside it, over K tiles for q k^T. q, k, v and h stay in the (B, T, H, D) layout.

Precision: bf16/fp16 operands, float32 accumulation; q C_c takes bf16 states for bf16 inputs and
float32 (TF32 dot) for fp16 inputs; float32 inputs use full-precision float32 dots.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tfla_jax import gates
from tfla_jax.backends.triton.common import F32, NT, out_struct, params, precision, state_dtype


def _output_kernel(q_ref, k_ref, v_ref, bhq_ref, row_ref, start_ref, wi_ref, floor_ref,
                   bhk_ref, col_ref, c_ref, n_ref, h_ref, den_ref, *, block_q, block_kv,
                   block_k, normalize, eps, precision, op_dtype):
    # q_ref [bq, K], k_ref [L, K], v_ref [L, bv]; bhq/row/start/wi/floor_ref [bq] (query rows);
    # bhk_ref, col_ref [L] (the chunk); c_ref [K, bv] (C_c), n_ref [K] (n_c);
    # out h_ref [bq, bv], den_ref [bq].
    K = q_ref.shape[-1]
    nk = K // block_k
    r0 = pl.program_id(1) * block_q                                        # first row in chunk
    q_pos = r0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    bh_q, row_q, start_q = bhq_ref[...], row_ref[...], start_ref[...]

    # Inter-chunk term over K slices of at most 64 rows of the C tile (a [block_k, block_v]
    # float32 tile would not fit in registers).
    acc = None
    qn = None
    bki = min(block_k, 64)
    for kt in range(K // bki):
        ks = pl.ds(kt * bki, bki)
        qk = q_ref[:, ks]                                                   # [bq, bki]
        part = jnp.dot(qk.astype(op_dtype), c_ref[ks, :].astype(op_dtype),
                       preferred_element_type=F32, precision=precision)    # [bq, bv]
        qn_part = jnp.sum(qk.astype(F32) * n_ref[ks][None, :], axis=1)
        acc = part if acc is None else acc + part
        qn = qn_part if qn is None else qn + qn_part
    w_inter = wi_ref[...]
    acc = acc * w_inter[:, None]
    den = qn * w_inter

    q_tiles = [q_ref[:, pl.ds(kt * block_k, block_k)] for kt in range(nk)]  # stay on chip

    def kv_body(j, carry):
        acc, den = carry
        s0 = pl.multiple_of(j * block_kv, block_kv)
        kv = pl.ds(s0, block_kv)
        s = None
        for kt in range(nk):
            kk = k_ref[kv, pl.ds(kt * block_k, block_k)]                   # [bkv, bk]
            part = lax.dot_general(q_tiles[kt], kk, NT, preferred_element_type=F32,
                                   precision=precision)
            s = part if s is None else s + part                             # [bq, bkv]
        kv_pos = s0 + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
        log_p = gates.intra_log_weights(bh_q, row_q, bhk_ref[kv], col_ref[kv])
        p = gates.masked_exp(log_p, gates.intra_mask(q_pos, kv_pos, start_q)) * s
        den = den + jnp.sum(p, axis=1)
        vv = v_ref[kv, :]                                                   # [bkv, bv]
        acc = acc + jnp.dot(p.astype(vv.dtype), vv, preferred_element_type=F32,
                            precision=precision)
        return acc, den

    # kv tiles up to the causal diagonal in one masked loop: chunks hold few tiles, and one
    # longer loop pipelines better than an unmasked loop plus a diagonal one (measured).
    n_end = (r0 + block_q + block_kv - 1) // block_kv
    acc, den = lax.fori_loop(0, n_end, kv_body, (acc, den))

    if normalize:
        acc = acc / (jnp.maximum(jnp.abs(den), floor_ref[...]) + eps)[:, None]
    h_ref[...] = acc.astype(h_ref.dtype)

    @pl.when(pl.program_id(0) == 0)
    def _():
        den_ref[...] = den


def chunk_output(q, k, v, gt, c_states, n_states, *, config, normalize, eps, interpret):
    """h (B, T, H, V) in v's dtype and den (B, H, T) float32.

    q, k: (B, T, H, K), v: (B, T, H, V); gt: ChunkGates; c_states (B, H, NC+1, K, V),
    n_states (B, H, NC+1, K) from `chunk_states` (index c = the state entering chunk c).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    L = config.chunk_size
    NC = T // L
    bq, bkv, bv = config.block_q, config.block_kv, config.block_v
    nq = L // bq
    kernel = functools.partial(
        _output_kernel, block_q=bq, block_kv=bkv, block_k=config.block_k, normalize=normalize,
        eps=eps, precision=precision(q.dtype), op_dtype=state_dtype(q.dtype))
    bh = lambda z: (z // H, z % H)  # noqa: E731  grid index -> (b, h)
    query_rows = pl.BlockSpec((None, None, bq), lambda vi, qi, c, z: (*bh(z), c * nq + qi))
    chunk_rows = pl.BlockSpec((None, None, L), lambda vi, qi, c, z: (*bh(z), c))
    in_specs = [
        pl.BlockSpec((None, bq, None, K), lambda vi, qi, c, z: (bh(z)[0], c * nq + qi, bh(z)[1], 0)),
        pl.BlockSpec((None, L, None, K), lambda vi, qi, c, z: (bh(z)[0], c, bh(z)[1], 0)),
        pl.BlockSpec((None, L, None, bv), lambda vi, qi, c, z: (bh(z)[0], c, bh(z)[1], vi)),
        query_rows, query_rows, query_rows, query_rows, query_rows,
        chunk_rows, chunk_rows,
        pl.BlockSpec((None, None, None, K, bv), lambda vi, qi, c, z: (*bh(z), c, 0, vi)),
        pl.BlockSpec((None, None, None, K), lambda vi, qi, c, z: (*bh(z), c, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, bv),
                     lambda vi, qi, c, z: (bh(z)[0], c * nq + qi, bh(z)[1], vi)),
        query_rows,
    ]
    out_shape = [out_struct((B, T, H, V), v.dtype, q), out_struct((B, H, T), F32, q)]
    return pl.pallas_call(
        kernel, grid=(V // bv, nq, NC, B * H), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name="mlstm_fwd_output",
        compiler_params=params(config.num_warps, config.num_stages),
    )(q, k, v, gt.bh, gt.row, gt.start, gt.w_inter, gt.floor, gt.bh, gt.col, c_states,
      n_states)
