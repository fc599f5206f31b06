"""TFLA backward: exact mLSTM gradients as Pallas (Triton lowering) kernels (design/mlstm.md §4).

The stabiliser m is held constant (it is `stop_gradient`'ed in the references), so the backward
is the gradient of the unstabilised function: the normaliser's gradient (dden) is kept and
cotangents on the final state are honoured. Per (batch, head), chunk c = 0..NC-1 (positions
cL .. cL+L-1), state index c = the state entering chunk c (0 = initial state, NC = final state):

    dnum_t  = dh_t / (N_t + eps)                           (dh_t when normalize is off)
    dden_t  = -(dh_t . h_t) / (N_t + eps) * sign(den_t) * [|den_t| > floor_t]
    dS_ts   = dnum_t . v_s + dden_t,   dA = dS * P,   P_ts = exp(b_t - b_s + logi_s - m_t) (s <= t)
    dC_c    = decay_c dC_{c+1} + sum_t (scale w_inter_t q_t)^T dnum_t                 (reverse)
    dn_c    = decay_c dn_{c+1} + sum_t scale w_inter_t dden_t q_t
    dq_t    = scale [sum_s dA_ts k_s + w_inter_t (C_c dnum_t + dden_t n_c)]
    dk_s    = scale sum_t dA_ts q_t + w_state_s (dC_{c+1} v_s + dn_{c+1})
    dv_s    = sum_t S_ts dnum_t + w_state_s dC_{c+1}^T k_s,     S = scale (q k^T) * P
    d f~_t  = (sum_{t' >= t} r_t' + Z) sigmoid(-f~_t),   r = q.dq - k.dk,
              Z = <dC_T, C_T> + <dn_T, n_T>
            = (sum_{t' >= t in chunk c} r_t' + <C_{c+1}, dC_{c+1}> + <n_{c+1}, dn_{c+1}>)
              * sigmoid(-f~_t)
              (r summed over a whole chunk telescopes to <C_c,dC_c> - <C_{c+1},dC_{c+1}> + n terms;
              the boundary terms come from the float32 dC in the recurrence kernel, so no sum of
              T cancelling terms is formed: 4-10x smaller d f~ error in bf16)
    d i~_t  = k_t . dk_t  (exp)      (k_t . dk_t) sigmoid(-i~_t)  (sigmoid)
    dm_0    = <dC_0, C_0> + <dn_0, n_0>  (exp; 0 for sigmoid)
with w_inter_t = exp(b_t + m_c - m_t), w_state_s = exp(a_s - m_{c+1}),
decay_c = exp(g_c + m_c - m_{c+1}).

Kernels (all `pl.pallas_call` with `plt.CompilerParams`):
  _chunk_states_kernel   C_c, n_c at every chunk boundary (recomputed when the forward kept none);
                         sequential over chunks, parallel over (K tile, V tile, batch, head)
  _state_grads_kernel    dC_c, dn_c by the reverse recurrence above, and <C_c, dC_c>; same grid
  _dq_kernel             dq tiles (query tile x K tile), loops over kv tiles up to the diagonal and
                         over V tiles; inter-chunk term from C_c, n_c; also q . dq per row
  _dk_kernel             dk tiles (kv tile x K tile), loops over query tiles from the diagonal and
                         over V tiles; inter-chunk term from dC_{c+1}, dn_{c+1}; also k . dk per row
  _dv_kernel             dv tiles (kv tile x V tile), loops over query tiles and K tiles
Gate preprocessing (cumsums, stabilisers, weights), the per-row normaliser terms and the gate
gradients (an in-chunk reverse cumsum) are cheap elementwise/scan work and run in XLA.

Precision: float32 for every gate quantity, accumulator and recurrence carry; matmul operands in
the input dtype. For bf16 inputs the chunk-boundary states and state cotangents are stored in bf16
between kernels (they only feed matmuls, which round them to bf16 anyway; dC_0, C_T and the
<C, dC> terms stay float32); float16 and float32 inputs keep them in float32 (float16 would
overflow). float32 inputs use full-precision (IEEE, not TF32) dots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tfla_jax.pallas.common import initial_state_f32, out_struct, pad_last
from tfla_jax.ref import gates
from tfla_jax.ref.chunkwise import chunk_gates

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b
_NN = (((1,), (0,)), ((), ()))   # a @ b


@dataclasses.dataclass(frozen=True)
class BwdTilingConfig:
    """Tile sizes and launch parameters of the backward kernels (hashable: a static argument).

    Every block is a power of two >= 16, clipped to the chunk and to the padded head dims.
    chunk_size:   L, the chunk length (the forward's).
    dq and dk kernels:
      block_q, block_kv: query / key rows per tile (dq output tile and loop tile of dk, and the
                    other way round).
      block_v:      V tile of their inner loops (dA recomputation, inter-chunk terms).
      block_k_out:  K tile of the dq / dk outputs (None: all of K, so dA is computed once).
      num_warps, num_stages: Triton launch parameters.
    dv kernel:
      block_k:      K tile of its inner loops (S recomputation, inter-chunk term).
      block_v_out:  V tile of the dv output (None: all of V; S is recomputed once per tile).
      block_q_dv, block_kv_dv: query / key rows per tile (None: block_q / block_kv).
      num_warps_dv, num_stages_dv.
    sequential chunk-state kernels (states recomputation and the dC, dn recurrence):
      block_k_state, block_v_state: the (K x V) tile of C / dC owned by one program.
      block_t_state: rows of a chunk per dot.
      num_warps_state, num_stages_state.
    """

    chunk_size: int = 256
    block_q: int = 64
    block_kv: int = 64
    block_v: int = 64
    block_k_out: int | None = None
    num_warps: int = 8
    num_stages: int = 4
    block_k: int = 256
    block_v_out: int | None = 256
    block_q_dv: int | None = None
    block_kv_dv: int | None = None
    num_warps_dv: int = 8
    num_stages_dv: int = 2
    block_k_state: int = 64
    block_v_state: int = 128
    block_t_state: int = 64
    num_warps_state: int = 4
    num_stages_state: int = 3

    @classmethod
    def get_default(cls, chunk_size: int = 256, dk: int | None = None, dv: int | None = None,
                    dtype=None) -> "BwdTilingConfig":
        """Defaults for a chunk size, head dims and input dtype.

        bf16: the fastest measured tiling per kernel on an H100 at K=256, V=512, L=256
        (benchmarks/NOTES_bwd.md). float16 keeps states in float32 for its matmuls and float32
        uses float32 operands, so both take smaller tiles / fewer stages to fit shared memory.
        """
        kp = _pow2_at_least_16(dk) if dk else 256
        vp = _pow2_at_least_16(dv) if dv else 512
        dtype = jnp.dtype(jnp.bfloat16 if dtype is None else dtype)
        if dtype.itemsize >= 4:
            return cls(chunk_size=chunk_size, block_k_out=64, num_stages=2, block_k=64,
                       block_v_out=64, num_warps_dv=4, block_v_state=64, block_t_state=32,
                       num_stages_state=2)
        small = max(kp, vp) <= 64
        warps = 4 if small else 8
        if dtype == jnp.float16:
            return cls(chunk_size=chunk_size, block_k_out=128, num_warps=warps, num_stages=2,
                       block_k=64, block_v_out=128, num_warps_dv=warps, num_stages_state=2)
        return cls(chunk_size=chunk_size, num_warps=warps, num_warps_dv=warps,
                   num_stages=4 if kp <= 256 else 2)


def _pow2_at_least_16(n: int) -> int:
    return max(16, pl.next_power_of_2(n))


def _check_tile(name, value, limit):
    if value < 16 or value & (value - 1):
        raise ValueError(f"config.{name}: expected a power of two >= 16, got {value}")
    return min(value, limit)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

def _chunk_states_kernel(k_ref, v_ref, w_ref, decay_ref, c0_ref, n0_ref, c_ref, n_ref,
                         c_last_ref, *, chunk, block_t, num_chunks, precision):
    """C_{c+1} = decay_c C_c + (w k_c)^T v_c over the chunks; one (K x V) tile per program.

    k_ref [T, bk], v_ref [T, bv], w_ref [T] (w_state), decay_ref [NC], c0_ref [bk, bv],
    n0_ref [bk]; out c_ref [NC+1, bk, bv] (matmul dtype), n_ref [NC+1, bk] (written by V tile 0
    only), c_last_ref [bk, bv] (the final state in float32).
    """
    first_v_tile = pl.program_id(1) == 0
    c = c0_ref[...].astype(_F32)
    n = n0_ref[...].astype(_F32)
    c_ref[0] = c.astype(c_ref.dtype)

    @pl.when(first_v_tile)
    def _():
        n_ref[0] = n

    def body(t, carry):
        d = decay_ref[t]
        c, n = carry[0] * d, carry[1] * d

        def rows_body(j, carry):
            c, n = carry
            rows = pl.ds(pl.multiple_of(t * chunk + j * block_t, block_t), block_t)
            kk = k_ref[rows, :]
            kw = kk.astype(_F32) * w_ref[rows][:, None]                  # [bt, bk]
            c = c + lax.dot_general(kw.astype(kk.dtype), v_ref[rows, :], _TN,
                                    preferred_element_type=_F32, precision=precision)
            return c, n + jnp.sum(kw, axis=0)

        c, n = lax.fori_loop(0, chunk // block_t, rows_body, (c, n))
        c_ref[t + 1] = c.astype(c_ref.dtype)

        @pl.when(first_v_tile)
        def _():
            n_ref[t + 1] = n

        return c, n

    c, _ = lax.fori_loop(0, num_chunks, body, (c, n))
    c_last_ref[...] = c


def _state_grads_kernel(q_ref, dh_ref, wq_ref, wd_ref, decay_ref, c_ref, dct_ref, dnt_ref,
                        dc_ref, dn_ref, dc_first_ref, zc_ref, *, chunk, block_t, num_chunks,
                        inter_dtype, precision):
    """dC_c = decay_c dC_{c+1} + (wq q_c)^T dh_c, dn_c = decay_c dn_{c+1} + sum wd q_c (reverse).

    q_ref [T, bk], dh_ref [T, bv], wq_ref/wd_ref [T] (scale w_inter / (N + eps), scale w_inter
    dden), decay_ref [NC], c_ref [NC+1, bk, bv] (the states), dct_ref [bk, bv], dnt_ref [bk];
    out dc_ref [NC+1, bk, bv] (matmul dtype), dn_ref [NC+1, bk] (written by V tile 0 only),
    dc_first_ref [bk, bv] (dC_0, float32), zc_ref [NC+1] (this tile's part of <C_c, dC_c>, from
    the float32 dC: the cross-chunk part of the forget-gate gradient).
    """
    first_v_tile = pl.program_id(1) == 0
    dc = dct_ref[...].astype(_F32)
    dn = dnt_ref[...].astype(_F32)
    dc_ref[num_chunks] = dc.astype(dc_ref.dtype)
    zc_ref[num_chunks] = jnp.sum(c_ref[num_chunks].astype(_F32) * dc)

    @pl.when(first_v_tile)
    def _():
        dn_ref[num_chunks] = dn

    def body(s, carry):
        t = num_chunks - 1 - s
        d = decay_ref[t]
        dc, dn = carry[0] * d, carry[1] * d

        def rows_body(j, carry):
            dc, dn = carry
            rows = pl.ds(pl.multiple_of(t * chunk + j * block_t, block_t), block_t)
            qf = q_ref[rows, :].astype(_F32)
            dc = dc + lax.dot_general((qf * wq_ref[rows][:, None]).astype(inter_dtype),
                                      dh_ref[rows, :].astype(inter_dtype), _TN,
                                      preferred_element_type=_F32, precision=precision)
            return dc, dn + jnp.sum(qf * wd_ref[rows][:, None], axis=0)

        dc, dn = lax.fori_loop(0, chunk // block_t, rows_body, (dc, dn))
        dc_ref[t] = dc.astype(dc_ref.dtype)
        zc_ref[t] = jnp.sum(c_ref[t].astype(_F32) * dc)

        @pl.when(first_v_tile)
        def _():
            dn_ref[t] = dn

        return dc, dn

    dc, _ = lax.fori_loop(0, num_chunks, body, (dc, dn))
    dc_first_ref[...] = dc


def _decay_matrix(b_q, m_q, b_kv, logi_kv, q_pos, kv_pos):
    """P[t, s] = exp(b_t - b_s + logi_s - m_t) for s <= t, else 0: [queries, keys]."""
    log_p = (b_q - m_q)[:, None] + (logi_kv - b_kv)[None, :]
    return jnp.exp(jnp.where(q_pos[:, None] >= kv_pos[None, :], log_p, -jnp.inf))


def _decay_matrix_t(b_q, m_q, b_kv, logi_kv, q_pos, kv_pos):
    """P^T: [keys, queries], built directly (no register transpose)."""
    log_p = (logi_kv - b_kv)[:, None] + (b_q - m_q)[None, :]
    return jnp.exp(jnp.where(q_pos[None, :] >= kv_pos[:, None], log_p, -jnp.inf))


def _dq_kernel(q_ref, k_ref, v_ref, dh_ref, bq_ref, mq_ref, invn_ref, dden_ref, wi_ref,
               bkv_ref, logi_ref, c_ref, n_ref, dq_ref, qdq_ref, *,
               chunk, block_q, block_kv, block_v, scale, precision, inter_dtype,
               inter_precision):
    """One (query tile, K tile) of dq and the per-row partial q . dq.

    q_ref [bq, bko]; k_ref [L, bko], v_ref [L, Vp] (this chunk); dh_ref [bq, Vp];
    bq_ref, mq_ref, invn_ref, dden_ref, wi_ref [bq] (b, m_row, 1/(N+eps), dden, w_inter of the
    rows); bkv_ref, logi_ref [L] (b, log i of the chunk); c_ref [bko, Vp], n_ref [bko] (state
    entering the chunk). out dq_ref [bq, bko], qdq_ref [bq].
    """
    dtype = q_ref.dtype
    num_v = v_ref.shape[-1] // block_v
    tile = lax.rem(pl.program_id(0), chunk // block_q)
    q_pos = tile * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    b_q = bq_ref[...]
    m_q = mq_ref[...]
    inv_n = invn_ref[...]
    dden = dden_ref[...]

    def kv_body(s, dq):
        kv_rows = pl.ds(pl.multiple_of(s * block_kv, block_kv), block_kv)

        def v_body(vt, dh_v):
            cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
            return dh_v + lax.dot_general(dh_ref[:, cols], v_ref[kv_rows, cols], _NT,
                                          preferred_element_type=_F32, precision=precision)

        dh_v = lax.fori_loop(0, num_v, v_body, jnp.zeros((block_q, block_kv), _F32))
        kv_pos = s * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
        p = _decay_matrix(b_q, m_q, bkv_ref[kv_rows], logi_ref[kv_rows], q_pos, kv_pos)
        d_a = (dh_v * inv_n[:, None] + dden[:, None]) * p                 # [bq, bkv]
        return dq + lax.dot_general(d_a.astype(dtype), k_ref[kv_rows, :], _NN,
                                    preferred_element_type=_F32, precision=precision)

    num_kv = lax.div((tile + 1) * block_q + block_kv - 1, block_kv)
    dq = lax.fori_loop(0, num_kv, kv_body, jnp.zeros(dq_ref.shape, _F32))

    # Inter-chunk term: w_inter (C_c dnum + dden n_c).
    w = wi_ref[...]

    def inter_body(vt, acc):
        cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
        return acc + lax.dot_general(dh_ref[:, cols].astype(inter_dtype),
                                     c_ref[:, cols].astype(inter_dtype), _NT,
                                     preferred_element_type=_F32, precision=inter_precision)

    dh_c = lax.fori_loop(0, num_v, inter_body, jnp.zeros(dq_ref.shape, _F32))
    dq = (dq + w[:, None] * (inv_n[:, None] * dh_c + dden[:, None] * n_ref[...][None, :])) * scale
    dq_ref[...] = dq.astype(dq_ref.dtype)
    qdq_ref[...] = jnp.sum(q_ref[...].astype(_F32) * dq, axis=1)


def _dk_kernel(k_ref, v_ref, q_ref, dh_ref, bkv_ref, logi_ref, ws_ref, bq_ref, mq_ref,
               invn_ref, dden_ref, dc_ref, dn_ref, dk_ref, kdk_ref, *,
               chunk, block_q, block_kv, block_v, scale, precision, inter_dtype,
               inter_precision):
    """One (kv tile, K tile) of dk and the per-row partial k . dk.

    k_ref [bkv, bko], v_ref [bkv, Vp]; q_ref [L, bko], dh_ref [L, Vp] (this chunk);
    bkv_ref, logi_ref, ws_ref [bkv] (b, log i, w_state of the rows); bq_ref, mq_ref, invn_ref,
    dden_ref [L] (query side of the chunk); dc_ref [bko, Vp], dn_ref [bko] (cotangent of the state
    leaving the chunk). out dk_ref [bkv, bko], kdk_ref [bkv].
    """
    dtype = k_ref.dtype
    num_v = v_ref.shape[-1] // block_v
    tile = lax.rem(pl.program_id(0), chunk // block_kv)
    kv_pos = tile * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    b_kv = bkv_ref[...]
    logi_kv = logi_ref[...]

    def q_body(t, dk):
        rows = pl.ds(pl.multiple_of(t * block_q, block_q), block_q)
        inv_n = invn_ref[rows]

        def v_body(vt, v_dh):
            cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
            return v_dh + lax.dot_general(v_ref[:, cols], dh_ref[rows, cols], _NT,
                                          preferred_element_type=_F32, precision=precision)

        v_dh = lax.fori_loop(0, num_v, v_body, jnp.zeros((block_kv, block_q), _F32))
        q_pos = t * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        p_t = _decay_matrix_t(bq_ref[rows], mq_ref[rows], b_kv, logi_kv, q_pos, kv_pos)
        d_at = (v_dh * inv_n[None, :] + dden_ref[rows][None, :]) * p_t    # [bkv, bq]
        return dk + lax.dot_general(d_at.astype(dtype), q_ref[rows, :], _NN,
                                    preferred_element_type=_F32, precision=precision)

    first = lax.div(tile * block_kv, block_q)
    dk = lax.fori_loop(first, chunk // block_q, q_body, jnp.zeros(dk_ref.shape, _F32)) * scale

    # Chunk-state term: w_state (dC_{c+1} v + dn_{c+1}).
    def inter_body(vt, acc):
        cols = pl.ds(pl.multiple_of(vt * block_v, block_v), block_v)
        return acc + lax.dot_general(v_ref[:, cols].astype(inter_dtype),
                                     dc_ref[:, cols].astype(inter_dtype), _NT,
                                     preferred_element_type=_F32, precision=inter_precision)

    inter = lax.fori_loop(0, num_v, inter_body, jnp.zeros(dk_ref.shape, _F32))
    dk = dk + ws_ref[...][:, None] * (inter + dn_ref[...][None, :])
    dk_ref[...] = dk.astype(dk_ref.dtype)
    kdk_ref[...] = jnp.sum(k_ref[...].astype(_F32) * dk, axis=1)


def _dv_kernel(k_ref, q_ref, dh_ref, bkv_ref, logi_ref, ws_ref, bq_ref, mq_ref, invn_ref,
               dc_ref, dv_ref, *, chunk, block_q, block_kv, block_k, scale, precision,
               inter_dtype, inter_precision):
    """One (kv tile, V tile) of dv.

    k_ref [bkv, Kp]; q_ref [L, Kp], dh_ref [L, bvo] (this chunk); bkv_ref, logi_ref, ws_ref [bkv];
    bq_ref, mq_ref, invn_ref [L]; dc_ref [Kp, bvo] (cotangent of the state leaving the chunk).
    out dv_ref [bkv, bvo].
    """
    dtype = k_ref.dtype
    num_k = k_ref.shape[-1] // block_k
    tile = lax.rem(pl.program_id(0), chunk // block_kv)
    kv_pos = tile * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    b_kv = bkv_ref[...]
    logi_kv = logi_ref[...]

    def q_body(t, dv):
        rows = pl.ds(pl.multiple_of(t * block_q, block_q), block_q)

        def k_body(kt, s_t):
            cols = pl.ds(pl.multiple_of(kt * block_k, block_k), block_k)
            return s_t + lax.dot_general(k_ref[:, cols], q_ref[rows, cols], _NT,
                                         preferred_element_type=_F32, precision=precision)

        s_t = lax.fori_loop(0, num_k, k_body, jnp.zeros((block_kv, block_q), _F32))
        q_pos = t * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        p_t = _decay_matrix_t(bq_ref[rows], mq_ref[rows], b_kv, logi_kv, q_pos, kv_pos)
        # S^T / (N + eps) column-wise: dv += S^T dnum with dnum = dh / (N + eps).
        s_t = s_t * (p_t * (scale * invn_ref[rows])[None, :])             # [bkv, bq]
        return dv + lax.dot_general(s_t.astype(dtype), dh_ref[rows, :], _NN,
                                    preferred_element_type=_F32, precision=precision)

    first = lax.div(tile * block_kv, block_q)
    dv = lax.fori_loop(first, chunk // block_q, q_body, jnp.zeros(dv_ref.shape, _F32))

    # Chunk-state term: w_state dC_{c+1}^T k.
    def inter_body(kt, acc):
        cols = pl.ds(pl.multiple_of(kt * block_k, block_k), block_k)
        return acc + lax.dot_general(k_ref[:, cols].astype(inter_dtype),
                                     dc_ref[cols, :].astype(inter_dtype), _NN,
                                     preferred_element_type=_F32, precision=inter_precision)

    inter = lax.fori_loop(0, num_k, inter_body, jnp.zeros(dv_ref.shape, _F32))
    dv_ref[...] = (dv + ws_ref[...][:, None] * inter).astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (layout: q, k, v, dh (B, T, H, D); gate rows (B, H, T); states
# (B, H, NC+1, K, V); every head dim already padded to a power of two >= 16)
# --------------------------------------------------------------------------------------------

def _params(num_warps, num_stages):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _precision(dtype):
    """float32 inputs: full-precision dots (IEEE), not TF32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _inter_dtype(dtype):
    """Operand dtype of the dots with states / state cotangents (and 1/(N+eps)-scaled q): bf16
    for bf16 inputs, else float32 (float16 would overflow on large states)."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(_F32)


def _inter_kw(dtype):
    return dict(inter_dtype=_inter_dtype(dtype), inter_precision=_precision(dtype))


def chunk_states(k, v, w_state, decay, c0, n0, *, chunk, block_k, block_v, block_t, num_warps,
                 num_stages, interpret):
    """States at every chunk boundary: C (B,H,NC+1,K,V) in the matmul dtype (bf16 for bf16
    inputs, else float32), n (B,H,NC+1,K) float32, and the final C_NC (B,H,K,V) in float32."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NC = T // chunk
    kernel = functools.partial(_chunk_states_kernel, chunk=chunk, block_t=block_t,
                               num_chunks=NC, precision=_precision(k.dtype))
    tile = pl.BlockSpec((None, None, block_k, block_v), lambda kt, vt, b, h: (b, h, kt, vt))
    return pl.pallas_call(
        kernel,
        grid=(K // block_k, V // block_v, B, H),
        in_specs=[
            pl.BlockSpec((None, T, None, block_k), lambda kt, vt, b, h: (b, 0, h, kt)),
            pl.BlockSpec((None, T, None, block_v), lambda kt, vt, b, h: (b, 0, h, vt)),
            pl.BlockSpec((None, None, T), lambda kt, vt, b, h: (b, h, 0)),
            pl.BlockSpec((None, None, NC), lambda kt, vt, b, h: (b, h, 0)),
            tile,
            pl.BlockSpec((None, None, block_k), lambda kt, vt, b, h: (b, h, kt)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, NC + 1, block_k, block_v),
                         lambda kt, vt, b, h: (b, h, 0, kt, vt)),
            pl.BlockSpec((None, None, NC + 1, block_k), lambda kt, vt, b, h: (b, h, 0, kt)),
            tile,
        ],
        out_shape=[out_struct((B, H, NC + 1, K, V), _inter_dtype(k.dtype), k),
                   out_struct((B, H, NC + 1, K), _F32, k),
                   out_struct((B, H, K, V), _F32, k)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="mlstm_bwd_chunk_states",
    )(k, v, w_state, decay, c0, n0)


def state_grads(q, dh, wq, wd, decay, c_states, dc_t, dn_t, *, chunk, block_k, block_v, block_t,
                num_warps, num_stages, interpret):
    """Cotangents of every chunk-boundary state: dC (B,H,NC+1,K,V) in the matmul dtype,
    dn (B,H,NC+1,K) float32, dC_0 (B,H,K,V) float32, and per (K tile, V tile) the partial
    inner products <C_c, dC_c> (B,H,K/block_k,V/block_v,NC+1) float32."""
    B, T, H, K = q.shape
    V = dh.shape[-1]
    NC = T // chunk
    kernel = functools.partial(_state_grads_kernel, chunk=chunk, block_t=block_t,
                               num_chunks=NC, inter_dtype=_inter_dtype(q.dtype),
                               precision=_precision(q.dtype))
    tile = pl.BlockSpec((None, None, block_k, block_v), lambda kt, vt, b, h: (b, h, kt, vt))
    return pl.pallas_call(
        kernel,
        grid=(K // block_k, V // block_v, B, H),
        in_specs=[
            pl.BlockSpec((None, T, None, block_k), lambda kt, vt, b, h: (b, 0, h, kt)),
            pl.BlockSpec((None, T, None, block_v), lambda kt, vt, b, h: (b, 0, h, vt)),
            pl.BlockSpec((None, None, T), lambda kt, vt, b, h: (b, h, 0)),
            pl.BlockSpec((None, None, T), lambda kt, vt, b, h: (b, h, 0)),
            pl.BlockSpec((None, None, NC), lambda kt, vt, b, h: (b, h, 0)),
            pl.BlockSpec((None, None, NC + 1, block_k, block_v),
                         lambda kt, vt, b, h: (b, h, 0, kt, vt)),
            tile,
            pl.BlockSpec((None, None, block_k), lambda kt, vt, b, h: (b, h, kt)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, NC + 1, block_k, block_v),
                         lambda kt, vt, b, h: (b, h, 0, kt, vt)),
            pl.BlockSpec((None, None, NC + 1, block_k), lambda kt, vt, b, h: (b, h, 0, kt)),
            tile,
            pl.BlockSpec((None, None, None, None, NC + 1), lambda kt, vt, b, h: (b, h, kt, vt, 0)),
        ],
        out_shape=[out_struct((B, H, NC + 1, K, V), _inter_dtype(q.dtype), q),
                   out_struct((B, H, NC + 1, K), _F32, q),
                   out_struct((B, H, K, V), _F32, q),
                   out_struct((B, H, K // block_k, V // block_v, NC + 1), _F32, q)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="mlstm_bwd_state_grads",
    )(q, dh, wq, wd, decay, c_states, dc_t, dn_t)


def intra_chunk_dq(q, k, v, dh, b, m_row, inv_n, dden, w_inter, logi, c_states, n_states, *,
                   chunk, block_q, block_kv, block_v, block_k_out, scale, num_warps, num_stages,
                   interpret):
    """dq (B,T,H,K) in q's dtype and the partial row dots q . dq (B,H,K/block_k_out,T) float32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    per_chunk = chunk // block_q
    kernel = functools.partial(_dq_kernel, chunk=chunk, block_q=block_q, block_kv=block_kv,
                               block_v=block_v, scale=scale, precision=_precision(q.dtype),
                               **_inter_kw(q.dtype))

    def chunk_of(j):
        return lax.div(j, per_chunk)

    row = pl.BlockSpec((None, None, block_q), lambda j, kt, b_, h: (b_, h, j))
    chunk_row = pl.BlockSpec((None, None, chunk), lambda j, kt, b_, h: (b_, h, chunk_of(j)))
    return pl.pallas_call(
        kernel,
        grid=(T // block_q, K // block_k_out, B, H),
        in_specs=[
            pl.BlockSpec((None, block_q, None, block_k_out), lambda j, kt, b_, h: (b_, j, h, kt)),
            pl.BlockSpec((None, chunk, None, block_k_out),
                         lambda j, kt, b_, h: (b_, chunk_of(j), h, kt)),
            pl.BlockSpec((None, chunk, None, V), lambda j, kt, b_, h: (b_, chunk_of(j), h, 0)),
            pl.BlockSpec((None, block_q, None, V), lambda j, kt, b_, h: (b_, j, h, 0)),
            row, row, row, row, row,
            chunk_row, chunk_row,
            pl.BlockSpec((None, None, None, block_k_out, V),
                         lambda j, kt, b_, h: (b_, h, chunk_of(j), kt, 0)),
            pl.BlockSpec((None, None, None, block_k_out),
                         lambda j, kt, b_, h: (b_, h, chunk_of(j), kt)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, block_k_out), lambda j, kt, b_, h: (b_, j, h, kt)),
            pl.BlockSpec((None, None, None, block_q), lambda j, kt, b_, h: (b_, h, kt, j)),
        ],
        out_shape=[out_struct(q.shape, q.dtype, q),
                   out_struct((B, H, K // block_k_out, T), _F32, q)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="mlstm_bwd_dq",
    )(q, k, v, dh, b, m_row, inv_n, dden, w_inter, b, logi, c_states, n_states)


def intra_chunk_dk(q, k, v, dh, b, m_row, inv_n, dden, logi, w_state, dc_states, dn_states, *,
                   chunk, block_q, block_kv, block_v, block_k_out, scale, num_warps, num_stages,
                   interpret):
    """dk (B,T,H,K) in k's dtype and the partial row dots k . dk (B,H,K/block_k_out,T) float32."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    per_chunk = chunk // block_kv
    kernel = functools.partial(_dk_kernel, chunk=chunk, block_q=block_q, block_kv=block_kv,
                               block_v=block_v, scale=scale, precision=_precision(k.dtype),
                               **_inter_kw(k.dtype))

    def chunk_of(j):
        return lax.div(j, per_chunk)

    row = pl.BlockSpec((None, None, block_kv), lambda j, kt, b_, h: (b_, h, j))
    chunk_row = pl.BlockSpec((None, None, chunk), lambda j, kt, b_, h: (b_, h, chunk_of(j)))
    return pl.pallas_call(
        kernel,
        grid=(T // block_kv, K // block_k_out, B, H),
        in_specs=[
            pl.BlockSpec((None, block_kv, None, block_k_out), lambda j, kt, b_, h: (b_, j, h, kt)),
            pl.BlockSpec((None, block_kv, None, V), lambda j, kt, b_, h: (b_, j, h, 0)),
            pl.BlockSpec((None, chunk, None, block_k_out),
                         lambda j, kt, b_, h: (b_, chunk_of(j), h, kt)),
            pl.BlockSpec((None, chunk, None, V), lambda j, kt, b_, h: (b_, chunk_of(j), h, 0)),
            row, row, row,
            chunk_row, chunk_row, chunk_row, chunk_row,
            pl.BlockSpec((None, None, None, block_k_out, V),
                         lambda j, kt, b_, h: (b_, h, chunk_of(j) + 1, kt, 0)),
            pl.BlockSpec((None, None, None, block_k_out),
                         lambda j, kt, b_, h: (b_, h, chunk_of(j) + 1, kt)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_kv, None, block_k_out), lambda j, kt, b_, h: (b_, j, h, kt)),
            pl.BlockSpec((None, None, None, block_kv), lambda j, kt, b_, h: (b_, h, kt, j)),
        ],
        out_shape=[out_struct(k.shape, k.dtype, k),
                   out_struct((B, H, K // block_k_out, T), _F32, k)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="mlstm_bwd_dk",
    )(k, v, q, dh, b, logi, w_state, b, m_row, inv_n, dden, dc_states, dn_states)


def intra_chunk_dv(q, k, v, dh, b, m_row, inv_n, logi, w_state, dc_states, *, chunk, block_q,
                   block_kv, block_k, block_v_out, scale, num_warps, num_stages, interpret):
    """dv (B,T,H,V) in v's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    per_chunk = chunk // block_kv
    kernel = functools.partial(_dv_kernel, chunk=chunk, block_q=block_q, block_kv=block_kv,
                               block_k=block_k, scale=scale, precision=_precision(k.dtype),
                               **_inter_kw(k.dtype))

    def chunk_of(j):
        return lax.div(j, per_chunk)

    row = pl.BlockSpec((None, None, block_kv), lambda j, vt, b_, h: (b_, h, j))
    chunk_row = pl.BlockSpec((None, None, chunk), lambda j, vt, b_, h: (b_, h, chunk_of(j)))
    return pl.pallas_call(
        kernel,
        grid=(T // block_kv, V // block_v_out, B, H),
        in_specs=[
            pl.BlockSpec((None, block_kv, None, K), lambda j, vt, b_, h: (b_, j, h, 0)),
            pl.BlockSpec((None, chunk, None, K), lambda j, vt, b_, h: (b_, chunk_of(j), h, 0)),
            pl.BlockSpec((None, chunk, None, block_v_out),
                         lambda j, vt, b_, h: (b_, chunk_of(j), h, vt)),
            row, row, row,
            chunk_row, chunk_row, chunk_row,
            pl.BlockSpec((None, None, None, K, block_v_out),
                         lambda j, vt, b_, h: (b_, h, chunk_of(j) + 1, 0, vt)),
        ],
        out_specs=pl.BlockSpec((None, block_kv, None, block_v_out),
                               lambda j, vt, b_, h: (b_, j, h, vt)),
        out_shape=out_struct(v.shape, v.dtype, v),
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="mlstm_bwd_dv",
    )(k, q, dh, b, logi, w_state, b, m_row, inv_n, dc_states)


# --------------------------------------------------------------------------------------------
# Gate preprocessing and the host function
# --------------------------------------------------------------------------------------------

def _rows(x):
    """(B, T, H) -> (B, H, T) float32."""
    return jnp.swapaxes(x.astype(_F32), 1, 2)


def chunk_gate_terms(i, f, input_gate, chunk):
    """Per-position float32 gate terms (B, H, T): log i, b (inclusive cumsum in the chunk), a
    (reverse cumsum after the position, plus log i); per chunk (B, H, NC): g, max a."""
    logi = gates.log_input_gate(_rows(i), input_gate)
    B, H, T = logi.shape
    per_chunk = (B, H, T // chunk, chunk)
    b, g, a = chunk_gates(gates.log_forget_gate(_rows(f)).reshape(per_chunk),
                          logi.reshape(per_chunk))
    return logi, b.reshape(B, H, T), a.reshape(B, H, T), g, jnp.max(a, axis=-1)


def chunk_stabilisers(g, a_max, m0, input_gate):
    """m at every chunk boundary (B, H, NC+1): m_{c+1} = max(g_c + m_c, max a_c); 0 for sigmoid."""
    if input_gate != "exp":
        return jnp.zeros((*g.shape[:-1], g.shape[-1] + 1), _F32)

    def combine(first, second):  # composition of x -> max(x + g, A) maps, first then second
        g1, a1 = first
        g2, a2 = second
        return g1 + g2, jnp.maximum(a1 + g2, a2)

    G, A = lax.associative_scan(combine, (g, a_max), axis=-1)
    m = jnp.maximum(m0[..., None] + G, A)
    return jnp.concatenate([m0[..., None], m], axis=-1)


def _resolve_config(config, dk, dv, dtype) -> BwdTilingConfig:
    if isinstance(config, BwdTilingConfig):
        return config
    if config is None:
        return BwdTilingConfig.get_default(dk=dk, dv=dv, dtype=dtype)
    if isinstance(config, int):
        return BwdTilingConfig.get_default(config, dk, dv, dtype)
    bwd = getattr(config, "bwd", None)  # a forward config that carries backward tiles
    if isinstance(bwd, BwdTilingConfig):
        return bwd
    return BwdTilingConfig.get_default(config.chunk_size, dk, dv, dtype)


def mlstm_bwd(q, k, v, i, f, c0, n0, m0, h, den, m_row, dh, dc_T, dn_T, *, input_gate="exp",
              normalize=True, scale=None, eps=1e-6, config=None, interpret=False, states=None):
    """Exact gradients of the mLSTM (m held constant) by the TFLA backward kernels.

    q, k: (B, T, H, K); v, h, dh: (B, T, H, V) (h the forward output, dh its cotangent);
    i, f: (B, T, H) raw gate pre-activations; c0 (B, H, K, V), n0 (B, H, K), m0 (B, H): the
    initial state (None: zeros); den, m_row: (B, H, T) float32 forward residuals (the raw
    denominator before abs/max, the per-row stabiliser); dc_T (B, H, K, V), dn_T (B, H, K): the
    final-state cotangents (None or zeros allowed). T must be a multiple of the chunk size.
    states: None (recompute the chunk-boundary states in a Pallas kernel) or the forward's
    (C (B,H,NC+1,K,V), n (B,H,NC+1,K), m (B,H,NC+1)) float32, index 0 = initial state.
    config: a BwdTilingConfig, a forward TilingConfig (its chunk_size is used), a chunk size or
    None. Returns (dq, dk, dv, di, df, dc0, dn0, dm0): gradients in the dtypes of q, k, v, i, f;
    dc0, dn0, dm0 float32 (dm0 = 0 for the sigmoid gate).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = _resolve_config(config, K, V, q.dtype)
    L = cfg.chunk_size
    if T % L:
        raise ValueError(f"q: T={T} must be a multiple of the chunk size {L} (pad first)")
    Kp, Vp = _pow2_at_least_16(K), _pow2_at_least_16(V)
    block_q = _check_tile("block_q", cfg.block_q, L)
    block_kv = _check_tile("block_kv", cfg.block_kv, L)
    block_v = _check_tile("block_v", cfg.block_v, Vp)
    block_k_out = _check_tile("block_k_out", cfg.block_k_out or Kp, Kp)
    block_k = _check_tile("block_k", cfg.block_k, Kp)
    block_v_out = _check_tile("block_v_out", cfg.block_v_out or Vp, Vp)
    block_q_dv = _check_tile("block_q_dv", cfg.block_q_dv or block_q, L)
    block_kv_dv = _check_tile("block_kv_dv", cfg.block_kv_dv or block_kv, L)
    state_tiles = dict(
        block_k=_check_tile("block_k_state", cfg.block_k_state, Kp),
        block_v=_check_tile("block_v_state", cfg.block_v_state, Vp),
        block_t=_check_tile("block_t_state", cfg.block_t_state, L),
        num_warps=cfg.num_warps_state, num_stages=cfg.num_stages_state, interpret=interpret)
    NC = T // L
    scale = K ** -0.5 if scale is None else float(scale)
    exp_gate = input_gate == "exp"
    c0, n0, m0 = initial_state_f32(c0, n0, m0, B, H, K, V, exp_gate)
    dc_T = jnp.zeros((B, H, K, V), _F32) if dc_T is None else dc_T.astype(_F32)
    dn_T = jnp.zeros((B, H, K), _F32) if dn_T is None else dn_T.astype(_F32)

    # Padded head dims (zeros contribute nothing; sliced off at the end).
    qp, kp = pad_last(q, Kp), pad_last(k, Kp)
    vp, dhp = pad_last(v, Vp), pad_last(dh.astype(v.dtype), Vp)
    dc_Tp, dn_Tp = pad_last(dc_T, Kp, Vp), pad_last(dn_T, Kp)

    # Gates (XLA, float32).
    logi, b, a, g, a_max = chunk_gate_terms(i, f, input_gate, L)
    m_row = m_row.astype(_F32)
    if states is None:
        m_states = chunk_stabilisers(g, a_max, m0, input_gate)
    else:
        m_states = states[2].astype(_F32) if exp_gate else jnp.zeros((B, H, NC + 1), _F32)
    m_prev, m_next = m_states[..., :-1], m_states[..., 1:]
    per_chunk = lambda x: x.reshape(B, H, NC, L)
    w_inter = jnp.exp(per_chunk(b) + m_prev[..., None] - per_chunk(m_row)).reshape(B, H, T)
    w_state = jnp.exp(per_chunk(a) - m_next[..., None]).reshape(B, H, T)
    decay = jnp.exp(g + m_prev - m_next)                                  # (B, H, NC)

    # Normaliser terms per row.
    if normalize:
        floor = jnp.exp(-m_row) if exp_gate else jnp.ones_like(m_row)
        den = den.astype(_F32)
        inv_n = 1.0 / (jnp.maximum(jnp.abs(den), floor) + eps)
        dh_h = jnp.einsum("bthv,bthv->bht", dh.astype(_F32), h.astype(_F32))
        dden = jnp.where(jnp.abs(den) > floor, -dh_h * inv_n * jnp.sign(den), 0.0)
    else:
        inv_n = jnp.ones((B, H, T), _F32)
        dden = jnp.zeros((B, H, T), _F32)

    # Chunk-boundary states.
    # (Recomputed states are stored in the matmul dtype: they only feed dots, which round
    # them to it anyway; the final state, for Z, comes back in float32.)
    if states is None:
        c_states, n_states, c_final = chunk_states(
            kp, vp, w_state, decay, pad_last(c0, Kp, Vp), pad_last(n0, Kp), chunk=L,
            **state_tiles)
    else:
        c_final = pad_last(states[0][:, :, NC].astype(_F32), Kp, Vp)
        c_states = pad_last(states[0].astype(_inter_dtype(q.dtype)), Kp, Vp)
        n_states = pad_last(states[1].astype(_F32), Kp)

    # Reverse recurrence for the state cotangents.
    dc_states, dn_states, dc_first, zc = state_grads(
        qp, dhp, scale * w_inter * inv_n, scale * w_inter * dden, decay, c_states, dc_Tp, dn_Tp,
        chunk=L, **state_tiles)

    common = dict(chunk=L, scale=scale, interpret=interpret)
    dq, qdq = intra_chunk_dq(qp, kp, vp, dhp, b, m_row, inv_n, dden, w_inter, logi, c_states,
                             n_states, block_q=block_q, block_kv=block_kv, block_v=block_v,
                             block_k_out=block_k_out, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, **common)
    dk, kdk = intra_chunk_dk(qp, kp, vp, dhp, b, m_row, inv_n, dden, logi, w_state, dc_states,
                             dn_states, block_q=block_q, block_kv=block_kv, block_v=block_v,
                             block_k_out=block_k_out, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, **common)
    dv = intra_chunk_dv(qp, kp, vp, dhp, b, m_row, inv_n, logi, w_state, dc_states,
                        block_q=block_q_dv, block_kv=block_kv_dv, block_k=block_k,
                        block_v_out=block_v_out, num_warps=cfg.num_warps_dv,
                        num_stages=cfg.num_stages_dv, **common)

    # Gate gradients: d log i = k . dk and d F_t = sum_{t' >= t} (q . dq - k . dk)_t' + Z.
    # Summed over a whole chunk, q . dq - k . dk telescopes to <C_c, dC_c> - <C_{c+1}, dC_{c+1}>
    # (n terms alike; the intra-chunk parts cancel exactly), so for t in chunk c
    #     d F_t = (reverse cumsum of q . dq - k . dk inside chunk c)_t + <C_{c+1}, dC_{c+1}>
    #             + <n_{c+1}, dn_{c+1}>,
    # with the boundary terms from the float32 state cotangents: the same value as the reverse
    # cumsum over the whole sequence, without summing T cancelling terms.
    qdq, kdk = jnp.sum(qdq, axis=2), jnp.sum(kdk, axis=2)                # (B, H, T)
    z = (jnp.sum(dc_Tp * c_final, axis=(-2, -1))
         + jnp.sum(dn_Tp * n_states[:, :, NC], axis=-1))                  # (B, H) = Z
    zc = jnp.sum(zc, axis=(2, 3)) + jnp.sum(n_states * dn_states, axis=-1)  # (B, H, NC+1)
    zc = zc.at[..., NC].set(z)
    dF = (lax.cumsum(per_chunk(qdq - kdk), axis=3, reverse=True)
          + zc[..., 1:, None]).reshape(B, H, T)
    df = dF * jax.nn.sigmoid(-_rows(f))
    di = kdk if exp_gate else kdk * jax.nn.sigmoid(-_rows(i))

    dc0 = dc_first[..., :K, :V]
    dn0 = dn_states[:, :, 0, :K]
    if exp_gate:
        dm0 = jnp.sum(dc0 * c0, axis=(-2, -1)) + jnp.sum(dn0 * n0, axis=-1)
    else:
        dm0 = jnp.zeros((B, H), _F32)
    return (dq[..., :K], dk[..., :K], dv[..., :V],
            jnp.swapaxes(di, 1, 2).astype(i.dtype), jnp.swapaxes(df, 1, 2).astype(f.dtype),
            dc0, dn0, dm0)
