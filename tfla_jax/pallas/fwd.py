"""TFLA forward: chunk-state kernel + output kernel (Pallas, Triton lowering). Design §3.

Between XLA and the kernels (all float32, per (b, h), chunk k of length L, local index tau):
    F = logsig(f~), log i = i~ (exp) or logsig(i~) (sigmoid)
    b_tau = sum_{s<=tau} F_s,  g = b_L,  a_tau = sum_{s>tau} F_s + log i_tau  (XLA, in-chunk sums)
    u_s   = log i_s - b_s        so that  D~_{tau,s} = b_tau - b_s + log i_s = b_tau + u_s
Chunk-state kernel (sequential over chunks, parallel over (b, h) and tiles of C):
    m_k = max(g + m_{k-1}, max_tau a_tau)                         (exp; m = 0 for sigmoid)
    C_k = e^{g + m_{k-1} - m_k} C_{k-1} + sum_tau e^{a_tau - m_k} k_tau^T v_tau,  n_k likewise
    writes C, n, m entering every chunk and the final state (index 0 = initial state).
Output kernel (parallel over V tiles, query tiles, chunks, (b, h)):
    The stabiliser depends on the gates only:  m_tau = b_tau + max(m_{k-1}, max_{s<=tau} u_s),
    so each program takes the exact row max from one pass over the chunk's u (no online
    rescaling of the accumulators is needed; this is the value FlashAttention's running max
    converges to). With mu_tau = m_tau - b_tau:
      num_tau = e^{m_{k-1}-mu_tau} q^_tau C_{k-1} + sum_{s<=tau} (q^_tau . k_s) e^{u_s-mu_tau} v_s
      den_tau = e^{m_{k-1}-mu_tau} q^_tau . n_{k-1} + sum_{s<=tau} (q^_tau . k_s) e^{u_s-mu_tau}
      h_tau   = num_tau / (max(|den_tau|, e^{-m_tau}) + eps)
    (sigmoid: m = 0, mu = -b, floor 1). Writes h in (B, T, H, V) and per row den, m (float32).
q, k, v and h stay in the (B, T, H, D) layout: the BlockSpecs pick (chunk rows, one head).

Precision: bf16/fp16 operands with float32 accumulation; q C_{k-1} takes C rounded to bf16 for
bf16 inputs and a TF32 dot (C and q in float32) for fp16 inputs (C may exceed fp16's range);
float32 inputs use full-precision float32 dots (`lax.Precision.HIGHEST`) everywhere.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tfla_jax.pallas.common import initial_state_f32, out_struct, pad_last
from tfla_jax.pallas.config import TilingConfig, padded_head_dim
from tfla_jax.ref import gates
from tfla_jax.ref.chunkwise import chunk_gates

_F32 = jnp.float32


def _dot_precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _inter_dtype(dtype):
    """Operand dtype of q C_{k-1}: bf16 for bf16 inputs, else float32."""
    return jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else _F32


# ----------------------------------------------------------------------------------------------
# Gate preprocessing (XLA)
# ----------------------------------------------------------------------------------------------
def chunk_gate_terms(i, f, chunk_size: int, input_gate: str):
    """Per-position gate terms. i, f: (B, T, H) raw pre-activations, T a multiple of chunk_size.

    Returns float32 b, a, u: (B, H, T) and g, a_max = max_tau a_tau: (B, H, NC)
    (see the module docstring).
    """
    B, T, H = i.shape
    L = chunk_size
    NC = T // L
    i = jnp.swapaxes(i.astype(_F32), 1, 2).reshape(B, H, NC, L)
    f = jnp.swapaxes(f.astype(_F32), 1, 2).reshape(B, H, NC, L)
    F = gates.log_forget_gate(f)
    logi = gates.log_input_gate(i, input_gate)
    b, g, a = chunk_gates(F, logi)
    u = logi - b
    a_max = jnp.max(a, axis=-1)
    return b.reshape(B, H, T), a.reshape(B, H, T), u.reshape(B, H, T), g, a_max


# ----------------------------------------------------------------------------------------------
# Kernel 1: chunk states
# ----------------------------------------------------------------------------------------------
def _chunk_states_kernel(k_ref, v_ref, a_ref, g_ref, amax_ref, c0_ref, n0_ref, m0_ref,
                         c_ref, n_ref, m_ref, *, num_chunks, chunk_size, block_kv, exp_gate,
                         precision):
    # k_ref [T, bk], v_ref [T, bv], a_ref [T], g_ref [NC], amax_ref [NC], c0_ref [bk, bv],
    # n0_ref [bk], m0_ref []; outputs c_ref [NC+1, bk, bv], n_ref [NC+1, bk], m_ref [NC+1].
    # One flat loop over all T/block_kv sub-blocks (not a loop over chunks with an inner loop)
    # so that Triton pipelines the k/v loads across chunk boundaries; the chunk-boundary work
    # (store the state entering the chunk, new stabiliser, decay) runs on a chunk's first block.
    L = chunk_size
    n_sub = L // block_kv
    kt = pl.program_id(0)
    vt = pl.program_id(1)
    write_n = vt == 0
    write_m = jnp.logical_and(kt == 0, vt == 0)

    def store_state(idx, C, n, m):
        c_ref[idx] = C

        @pl.when(write_n)
        def _():
            n_ref[idx] = n

        @pl.when(write_m)
        def _():
            m_ref[idx] = m

    def body(j, carry):
        C, n, m = carry
        c = lax.div(j, n_sub)                                               # j >= 0
        first = lax.rem(j, n_sub) == 0

        @pl.when(first)
        def _():
            store_state(c, C, n, m)

        g = g_ref[c]
        if exp_gate:
            m_new = jnp.where(first, jnp.maximum(g + m, amax_ref[c]), m)
        else:
            m_new = m
        decay = jnp.where(first, jnp.exp(g + m - m_new), 1.0)
        s0 = pl.multiple_of(j * block_kv, block_kv)
        kk = k_ref[pl.ds(s0, block_kv), :]                                  # [bkv, bk]
        vv = v_ref[pl.ds(s0, block_kv), :]                                  # [bkv, bv]
        w = jnp.exp(a_ref[pl.ds(s0, block_kv)] - m_new)                     # [bkv]
        kw = kk.astype(_F32) * w[:, None]
        C = C * decay + lax.dot_general(kw.astype(kk.dtype), vv, (((0,), (0,)), ((), ())),
                                        preferred_element_type=_F32, precision=precision)
        n = n * decay + jnp.sum(kw, axis=0)
        return C, n, m_new

    C = c0_ref[...].astype(_F32)
    n = n0_ref[...].astype(_F32)
    m = m0_ref[...].astype(_F32) if exp_gate else jnp.zeros((), _F32)
    C, n, m = lax.fori_loop(0, num_chunks * n_sub, body, (C, n, m))
    store_state(num_chunks, C, n, m)


def chunk_states(k, v, a, g, a_max, c0, n0, m0, *, config: TilingConfig, exp_gate: bool,
                 interpret: bool = False):
    """States entering every chunk plus the final one.

    k: (B, T, H, K), v: (B, T, H, V) (K, V multiples of 16); a: (B, H, T), g, a_max: (B, H, NC);
    c0 (B, H, K, V), n0 (B, H, K), m0 (B, H) float32.
    Returns C (B, H, NC+1, K, V), n (B, H, NC+1, K), m (B, H, NC+1), float32.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    L = config.chunk_size
    NC = T // L
    bk, bv, bkv = config.states_block_k, config.states_block_v, config.states_block_kv
    nk, nv = K // bk, V // bv
    kernel = functools.partial(_chunk_states_kernel, num_chunks=NC, chunk_size=L, block_kv=bkv,
                               exp_gate=exp_gate, precision=_dot_precision(k.dtype))
    bh = lambda z: (z // H, z % H)  # noqa: E731  grid index -> (b, h)
    in_specs = [
        pl.BlockSpec((None, T, None, bk), lambda i, j, z: (bh(z)[0], 0, bh(z)[1], i)),
        pl.BlockSpec((None, T, None, bv), lambda i, j, z: (bh(z)[0], 0, bh(z)[1], j)),
        pl.BlockSpec((None, None, T), lambda i, j, z: (*bh(z), 0)),
        pl.BlockSpec((None, None, NC), lambda i, j, z: (*bh(z), 0)),
        pl.BlockSpec((None, None, NC), lambda i, j, z: (*bh(z), 0)),
        pl.BlockSpec((None, None, bk, bv), lambda i, j, z: (*bh(z), i, j)),
        pl.BlockSpec((None, None, bk), lambda i, j, z: (*bh(z), i)),
        pl.BlockSpec((None, None), lambda i, j, z: bh(z)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, NC + 1, bk, bv), lambda i, j, z: (*bh(z), 0, i, j)),
        pl.BlockSpec((None, None, NC + 1, bk), lambda i, j, z: (*bh(z), 0, i)),
        pl.BlockSpec((None, None, NC + 1), lambda i, j, z: (*bh(z), 0)),
    ]
    out_shape = [
        out_struct((B, H, NC + 1, K, V), _F32, k),
        out_struct((B, H, NC + 1, K), _F32, k),
        out_struct((B, H, NC + 1), _F32, k),
    ]
    return pl.pallas_call(
        kernel, grid=(nk, nv, B * H), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name="mlstm_fwd_chunk_states",
        compiler_params=plt.CompilerParams(num_warps=config.states_num_warps,
                                           num_stages=config.states_num_stages),
    )(k, v, a, g, a_max, c0, n0, m0)


# ----------------------------------------------------------------------------------------------
# Kernel 2: outputs (intra-chunk tiles + inter-chunk term)
# ----------------------------------------------------------------------------------------------
def _chunk_output_kernel(q_ref, k_ref, v_ref, b_ref, u_ref, c_ref, n_ref, m_ref,
                         h_ref, den_ref, mrow_ref, *, chunk_size, block_q, block_kv, block_k,
                         exp_gate, normalize, scale, eps, precision, inter_dtype):
    # q_ref [bq, K], k_ref [L, K], v_ref [L, bv], b_ref [bq], u_ref [L],
    # c_ref [K, bv] (C_{k-1}), n_ref [K] (n_{k-1}), m_ref [] (m_{k-1})
    # h_ref [bq, bv], den_ref [bq], mrow_ref [bq]
    L = chunk_size
    K = q_ref.shape[-1]
    nk = K // block_k
    vt = pl.program_id(0)
    r0 = pl.program_id(1) * block_q                                        # first row in chunk
    rows = r0 + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)            # [bq, 1]

    # Row stabiliser from the gates only: mu_tau = m_tau - b_tau = max(m_{k-1}, max_{s<=tau} u_s).
    b_rows = b_ref[...]                                                     # [bq]
    if exp_gate:
        m_prev = m_ref[...]
        u_chunk = u_ref[...]                                                # [L]
        before = lax.broadcasted_iota(jnp.int32, (L,), 0) < r0
        mu0 = jnp.maximum(m_prev, jnp.max(jnp.where(before, u_chunk, -jnp.inf)))
        u_diag = u_ref[pl.ds(r0, block_q)]                                  # [bq]
        diag = (lax.broadcasted_iota(jnp.int32, (block_q, block_q), 0)
                >= lax.broadcasted_iota(jnp.int32, (block_q, block_q), 1))
        mu = jnp.maximum(mu0, jnp.max(jnp.where(diag, u_diag[None, :], -jnp.inf), axis=1))
        m_row = b_rows + mu
        w_inter = jnp.exp(m_prev - mu)                                      # [bq]
        floor = jnp.exp(-m_row)
    else:
        mu = -b_rows
        m_row = jnp.zeros_like(b_rows)
        w_inter = jnp.exp(b_rows)
        floor = 1.0

    # Inter-chunk term: q^ C_{k-1} and q^ . n_{k-1}, over K slices of at most 64 rows of the
    # float32 C tile (a [block_k, block_v] f32 tile would not fit in registers).
    acc = None
    qn = None
    bki = min(block_k, 64)
    for kt in range(K // bki):
        ks = pl.ds(kt * bki, bki)
        qk = q_ref[:, ks]                                                   # [bq, bki]
        part = jnp.dot(qk.astype(inter_dtype), c_ref[ks, :].astype(inter_dtype),
                       preferred_element_type=_F32, precision=precision)   # [bq, bv]
        qn_part = jnp.sum(qk.astype(_F32) * n_ref[ks][None, :], axis=1)
        acc = part if acc is None else acc + part
        qn = qn_part if qn is None else qn + qn_part
    w_inter = w_inter * scale
    acc = acc * w_inter[:, None]
    den = qn * w_inter

    # q tiles stay on chip for the whole kv loop.
    q_tiles = [q_ref[:, pl.ds(kt * block_k, block_k)] for kt in range(nk)]  # nk x [bq, bk]

    def kv_body(j, carry):
        acc, den = carry
        s0 = pl.multiple_of(j * block_kv, block_kv)
        s = None
        for kt in range(nk):
            kk = k_ref[pl.ds(s0, block_kv), pl.ds(kt * block_k, block_k)]   # [bkv, bk]
            part = lax.dot_general(q_tiles[kt], kk, (((1,), (1,)), ((), ())),
                                   preferred_element_type=_F32, precision=precision)
            s = part if s is None else s + part                          # [bq, bkv]
        logw = u_ref[pl.ds(s0, block_kv)][None, :] - mu[:, None]          # [bq, bkv], <= 0
        cols = s0 + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        logw = jnp.where(rows >= cols, logw, -jnp.inf)                      # causal mask
        p = s * (jnp.exp(logw) * scale)
        den = den + jnp.sum(p, axis=1)
        vv = v_ref[pl.ds(s0, block_kv), :]                                  # [bkv, bv]
        acc = acc + jnp.dot(p.astype(vv.dtype), vv, preferred_element_type=_F32,
                            precision=precision)
        return acc, den

    # kv tiles up to the causal diagonal, in one loop with the mask applied everywhere: chunks
    # hold few tiles, and one longer loop pipelines better than an unmasked loop plus a
    # diagonal loop (measured, benchmarks/NOTES.md).
    n_end = (r0 + block_q + block_kv - 1) // block_kv
    acc, den = lax.fori_loop(0, n_end, kv_body, (acc, den))

    if normalize:
        acc = acc / (jnp.maximum(jnp.abs(den), floor) + eps)[:, None]
    h_ref[...] = acc.astype(h_ref.dtype)

    @pl.when(vt == 0)
    def _():
        den_ref[...] = den
        mrow_ref[...] = m_row


def chunk_output(q, k, v, b, u, c_states, n_states, m_states, *, config: TilingConfig,
                 exp_gate: bool, normalize: bool, scale: float, eps: float,
                 interpret: bool = False):
    """h (B, T, H, V) in v's dtype, den and m_row (B, H, T) float32.

    q, k: (B, T, H, K), v: (B, T, H, V); b, u: (B, H, T); c/n/m_states from `chunk_states`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    L = config.chunk_size
    NC = T // L
    bq, bkv, bk, bv = config.block_q, config.block_kv, config.block_k, config.block_v
    nq, nv = L // bq, V // bv
    kernel = functools.partial(
        _chunk_output_kernel, chunk_size=L, block_q=bq, block_kv=bkv, block_k=bk,
        exp_gate=exp_gate, normalize=normalize, scale=scale, eps=eps,
        precision=_dot_precision(q.dtype), inter_dtype=_inter_dtype(q.dtype))
    bh = lambda z: (z // H, z % H)  # noqa: E731  grid index -> (b, h)
    rows = lambda vi, qi, c, z, d: (bh(z)[0], c * nq + qi, bh(z)[1], d)  # noqa: E731 (B,T,H,D)
    in_specs = [
        pl.BlockSpec((None, bq, None, K), lambda vi, qi, c, z: rows(vi, qi, c, z, 0)),
        pl.BlockSpec((None, L, None, K), lambda vi, qi, c, z: (bh(z)[0], c, bh(z)[1], 0)),
        pl.BlockSpec((None, L, None, bv), lambda vi, qi, c, z: (bh(z)[0], c, bh(z)[1], vi)),
        pl.BlockSpec((None, None, bq), lambda vi, qi, c, z: (*bh(z), c * nq + qi)),
        pl.BlockSpec((None, None, L), lambda vi, qi, c, z: (*bh(z), c)),
        pl.BlockSpec((None, None, None, K, bv), lambda vi, qi, c, z: (*bh(z), c, 0, vi)),
        pl.BlockSpec((None, None, None, K), lambda vi, qi, c, z: (*bh(z), c, 0)),
        pl.BlockSpec((None, None, None), lambda vi, qi, c, z: (*bh(z), c)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, bv), lambda vi, qi, c, z: rows(vi, qi, c, z, vi)),
        pl.BlockSpec((None, None, bq), lambda vi, qi, c, z: (*bh(z), c * nq + qi)),
        pl.BlockSpec((None, None, bq), lambda vi, qi, c, z: (*bh(z), c * nq + qi)),
    ]
    out_shape = [
        out_struct((B, T, H, V), v.dtype, q),
        out_struct((B, H, T), _F32, q),
        out_struct((B, H, T), _F32, q),
    ]
    return pl.pallas_call(
        kernel, grid=(nv, nq, NC, B * H), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name="mlstm_fwd_chunk_output",
        compiler_params=plt.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
    )(q, k, v, b, u, c_states, n_states, m_states)


# ----------------------------------------------------------------------------------------------
# Host function
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("input_gate", "normalize", "scale", "eps", "config",
                                             "interpret", "return_states"))
def mlstm_fwd(q, k, v, i, f, c0=None, n0=None, m0=None, *, input_gate="exp", normalize=True,
              scale=None, eps=1e-6, config: TilingConfig | None = None, interpret=False,
              return_states=False):
    """TFLA forward on whole chunks.

    Args:
      q, k: (B, T, H, K); v: (B, T, H, V); one dtype of bf16 / fp16 / fp32. T must be a multiple
        of config.chunk_size (`mlstm_pallas` pads any T).
      i, f: (B, T, H) raw input / forget gate pre-activations (any float dtype; used in float32).
      c0 (B, H, K, V), n0 (B, H, K), m0 (B, H): initial state (float32), zeros when None.
        m0 is ignored for input_gate="sigmoid".
      input_gate: "exp" or "sigmoid"; normalize: divide by max(|den|, floor) + eps.
      scale: query scale (default K**-0.5); eps: added to the denominator.
      config: TilingConfig (default `TilingConfig.default`); interpret: Pallas interpret mode.
      return_states: also return the chunk-boundary states.

    Returns:
      h (B, T, H, V) in v's dtype; (c_T, n_T, m_T) the final state (float32);
      residuals = (den, m_row), float32 (B, H, T): den the raw denominator
        e^{b+m_{k-1}-m} q^.n_{k-1} + sum_s S_{tau,s} (before max/abs), m_row the row stabiliser;
        with return_states, followed by C (B, H, NC+1, K, V), n (B, H, NC+1, K), m (B, H, NC+1)
        (index 0 = initial state, index NC = final state).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    exp_gate = input_gate == "exp"
    if config is None:
        config = TilingConfig.default(K, V, T, q.dtype, input_gate)
    L = config.chunk_size
    if T % L:
        raise ValueError(f"mlstm_fwd: T={T} must be a multiple of chunk_size={L} "
                         "(use mlstm_pallas for any T)")
    config = config.resolve(K, V)
    scale = K ** -0.5 if scale is None else float(scale)
    c0, n0, m0 = initial_state_f32(c0, n0, m0, B, H, K, V, exp_gate)

    # Head dims to a multiple of 16 (zero padding leaves every dot unchanged).
    Kp, Vp = padded_head_dim(K), padded_head_dim(V)
    if (Kp, Vp) != (K, V):
        q, k, n0 = pad_last(q, Kp), pad_last(k, Kp), pad_last(n0, Kp)
        v = pad_last(v, Vp)
        c0 = pad_last(c0, Kp, Vp)

    b, a, u, g, a_max = chunk_gate_terms(i, f, L, input_gate)
    c_states, n_states, m_states = chunk_states(k, v, a, g, a_max, c0, n0, m0, config=config,
                                                exp_gate=exp_gate, interpret=interpret)
    h, den, m_row = chunk_output(q, k, v, b, u, c_states, n_states, m_states, config=config,
                                 exp_gate=exp_gate, normalize=normalize, scale=scale, eps=eps,
                                 interpret=interpret)
    if (Kp, Vp) != (K, V):
        h = h[..., :V]
        c_states, n_states = c_states[..., :K, :V], n_states[..., :K]
    final = (c_states[:, :, -1], n_states[:, :, -1], m_states[:, :, -1])
    residuals = (den, m_row)
    if return_states:
        residuals = residuals + (c_states, n_states, m_states)
    return h, final, residuals
