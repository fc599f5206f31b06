"""The chunkwise mLSTM form in pure JAX (design §3): the CPU/TPU path and the kernels' blueprint.

Memory O(T L + NC K V); no Python loop over T or chunks. Any T (padded internally so that the
final state stays exact) and any power-of-two chunk size L.
"""

import jax.numpy as jnp
from jax import lax

from tfla_jax.ref import gates
from tfla_jax.ref.parallel import segment_log_decay
from tfla_jax.ref.recurrent import zero_state
from tfla_jax.state import MLSTMState


def pad_to_chunks(q, k, v, i, f, chunk_size: int):
    """Pads the time axis (1) to a multiple of chunk_size: q = k = v = 0, i writes nothing, f keeps."""
    T = q.shape[1]
    pad = -T % chunk_size
    if pad == 0:
        return q, k, v, i, f

    def _pad(x, value):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        return jnp.pad(x, widths, constant_values=value)

    return (_pad(q, 0), _pad(k, 0), _pad(v, 0),
            _pad(i.astype(jnp.promote_types(i.dtype, jnp.float32)), gates.I_PAD),
            _pad(f.astype(jnp.promote_types(f.dtype, jnp.float32)), gates.F_PAD))


def chunk_gates(F, logi):
    """Per-chunk gate quantities. F, logi: [..., NC, L].

    b[tau] = sum_{s<=tau} F_s, g = b[L], a[tau] = sum_{s>tau} F_s + log i_tau.
    """
    b = jnp.cumsum(F, axis=-1)
    g = b[..., -1]
    F_after = jnp.concatenate([F[..., 1:], jnp.zeros_like(F[..., :1])], axis=-1)
    a = jnp.flip(jnp.cumsum(jnp.flip(F_after, -1), axis=-1), -1) + logi
    return b, g, a


def mlstm_chunkwise(q, k, v, i, f, *, input_gate="exp", normalize=True, initial_state=None,
                    scale=None, eps=1e-6, chunk_size=64, return_residuals=False):
    """Chunkwise form. Shapes as `mlstm_recurrent`; returns h and the final MLSTMState.

    With return_residuals, also what a chunkwise backward consumes, over the padded length
    Tp = NC * L: (den, m_row) (B, H, Tp), the raw denominator before abs/max and the row
    stabiliser, and the chunk-boundary states (C (B,H,NC+1,K,V), n (B,H,NC+1,K), m (B,H,NC+1)),
    index 0 the initial state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    L = chunk_size
    cdt = gates.compute_dtype(q, k, v, i, f, *(initial_state or ()))
    scale = K ** -0.5 if scale is None else scale
    if initial_state is None:
        initial_state = zero_state(B, H, K, V, cdt)
    c0, n0, m0 = (x.astype(cdt) for x in initial_state)
    exp_gate = input_gate == "exp"
    if not exp_gate:
        m0 = jnp.zeros_like(m0)

    q, k, v, i, f = pad_to_chunks(q, k, v, i, f, L)
    NC = q.shape[1] // L

    def to_chunks(x):  # (B, NC*L, H, ...) -> (B, H, NC, L, ...)
        x = x.astype(cdt).reshape(B, NC, L, H, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    qc, kc, vc = to_chunks(q) * scale, to_chunks(k), to_chunks(v)
    F = gates.log_forget_gate(to_chunks(f))                         # [B, H, NC, L]
    logi = gates.log_input_gate(to_chunks(i), input_gate)
    b, g, a = chunk_gates(F, logi)

    # Inter-chunk recurrence: every chunk's own contribution in parallel, then a cheap scan.
    if exp_gate:
        m_local = lax.stop_gradient(jnp.max(a, axis=-1))            # [B, H, NC]
    else:
        m_local = jnp.zeros_like(g)
    w = jnp.exp(a - m_local[..., None])                             # [B, H, NC, L]
    kw = kc * w[..., None]
    c_chunk = jnp.einsum("bhclk,bhclv->bhckv", kw, vc)              # [B, H, NC, K, V]
    n_chunk = jnp.sum(kw, axis=-2)                                  # [B, H, NC, K]

    def combine(state, x):
        c, n, m = state
        g_k, m_loc, c_k, n_k = x
        m_new = lax.stop_gradient(jnp.maximum(g_k + m, m_loc)) if exp_gate else m
        decay = jnp.exp(g_k + m - m_new)
        grow = jnp.exp(m_loc - m_new)
        c = decay[..., None, None] * c + grow[..., None, None] * c_k
        n = decay[..., None] * n + grow[..., None] * n_k
        return MLSTMState(c, n, m_new), state

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (g, m_local, c_chunk, n_chunk))
    final, prev = lax.scan(combine, MLSTMState(c0, n0, m0), xs)
    c_prev, n_prev, m_prev = (jnp.moveaxis(x, 0, 2) for x in prev)  # states entering each chunk

    # Intra-chunk (quadratic in L) combined with the inter-chunk term.
    causal = jnp.tril(jnp.ones((L, L), bool))
    logD = jnp.where(causal, segment_log_decay(F) + logi[..., None, :], -jnp.inf)  # [B,H,NC,L,L]
    log_inter = b + m_prev[..., None]                               # [B, H, NC, L]
    if exp_gate:
        m = lax.stop_gradient(jnp.maximum(log_inter, jnp.max(logD, axis=-1)))
    else:
        m = jnp.zeros_like(log_inter)
    S = jnp.einsum("bhctk,bhcsk->bhcts", qc, kc) * jnp.exp(logD - m[..., None])
    w_inter = jnp.exp(log_inter - m)
    num = w_inter[..., None] * jnp.einsum("bhctk,bhckv->bhctv", qc, c_prev) + S @ vc
    den = w_inter * jnp.einsum("bhctk,bhck->bhct", qc, n_prev) + jnp.sum(S, axis=-1)
    h = gates.normalized_output(num, den, m, input_gate, normalize, eps)  # [B, H, NC, L, V]
    h = jnp.moveaxis(h, 1, 3).reshape(B, NC * L, H, V)[:, :T].astype(v.dtype)
    if not return_residuals:
        return h, final
    states = tuple(jnp.concatenate([x, y[:, :, None]], axis=2)
                   for x, y in zip((c_prev, n_prev, m_prev), final))
    return h, final, (den.reshape(B, H, NC * L), m.reshape(B, H, NC * L)), states
