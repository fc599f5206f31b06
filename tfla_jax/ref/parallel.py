"""The quadratic (parallel) mLSTM form with the initial-state term (docs/math.md). O(T^2) memory."""

import jax.numpy as jnp
from jax import lax

from tfla_jax import gates
from tfla_jax.ref.recurrent import zero_state
from tfla_jax.state import MLSTMState


def mlstm_parallel(q, k, v, i, f, *, input_gate="exp", normalize=True, initial_state=None,
                   scale=None, eps=1e-6, seg_start=None):
    """Quadratic form. Shapes as `mlstm_recurrent`; returns h and the final MLSTMState."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = gates.compute_dtype(q, k, v, i, f, *(initial_state or ()))
    scale = K ** -0.5 if scale is None else scale
    has_state = initial_state is not None
    if initial_state is None:
        initial_state = zero_state(B, H, K, V, cdt)
    c0, n0, m0 = (x.astype(cdt) for x in initial_state)
    if input_gate != "exp":
        m0 = jnp.zeros_like(m0)
    qh = jnp.swapaxes(q.astype(cdt), 1, 2) * scale                  # [B, H, T, K]
    kh, vh = (jnp.swapaxes(x.astype(cdt), 1, 2) for x in (k, v))
    F = gates.log_forget_gate(jnp.swapaxes(f.astype(cdt), 1, 2))    # [B, H, T]
    logi = gates.log_input_gate(jnp.swapaxes(i.astype(cdt), 1, 2), input_gate)

    causal = jnp.tril(jnp.ones((T, T), bool))
    start = jnp.zeros(F.shape, bool) if seg_start is None else jnp.broadcast_to(
        seg_start[:, None, :], F.shape)
    reset = (F <= gates.RESET_LOG_F) | start
    F_kill = jnp.where(reset, -jnp.inf, F)                          # nothing crosses a reset
    logD = jnp.where(causal, gates.segment_log_decay(F_kill) + logi[..., None, :], -jnp.inf)
    log_init = jnp.cumsum(F, axis=-1) + m0[..., None]               # [B, H, T]
    init_killed = jnp.cumsum(reset, axis=-1) > 0
    # The stabiliser's base: m0 decayed by F (first sequence), or 0 decayed from the start of
    # the position's sequence (the recurrence restarts at m = 0).
    cs = jnp.cumsum(F, axis=-1)
    t_idx = lax.broadcasted_iota(jnp.int32, F.shape, 2)
    first = lax.cummax(jnp.where(start, t_idx, 0), axis=2)          # the sequence's first index
    before = jnp.take_along_axis(cs - F, first, axis=-1)            # cumsum before it
    log_base = jnp.where(lax.cummax(start.astype(jnp.int32), axis=2) > 0, cs - before,
                         log_init)
    if input_gate == "exp":
        m = lax.stop_gradient(jnp.maximum(log_base, jnp.max(logD, axis=-1)))
    else:
        m = jnp.zeros_like(log_init)
    S = jnp.einsum("bhtk,bhsk->bhts", qh, kh) * jnp.exp(logD - m[..., None])
    num, den = S @ vh, jnp.sum(S, axis=-1)
    if has_state:  # skipped for the zero state (also sidesteps an XLA:CPU miscompile of q @ zeros)
        w_init = jnp.exp(jnp.where(init_killed, -jnp.inf, log_init - m))
        num = num + w_init[..., None] * jnp.einsum("bhtk,bhkv->bhtv", qh, c0)
        den = den + w_init * jnp.einsum("bhtk,bhk->bht", qh, n0)
    h = gates.normalized_output(num, den, gates.denominator_floor(m, input_gate), normalize, eps)

    # Final state: the unrolled recurrence at t = T, weights relative to m_T.
    m_T = m[..., -1]
    w_s = jnp.exp(logD[..., -1, :] - m_T[..., None])                # [B, H, T]
    w_0 = jnp.exp(jnp.where(init_killed[..., -1], -jnp.inf, log_init[..., -1] - m_T))
    c_T = w_0[..., None, None] * c0 + jnp.einsum("bhs,bhsk,bhsv->bhkv", w_s, kh, vh)
    n_T = w_0[..., None] * n0 + jnp.einsum("bhs,bhsk->bhk", w_s, kh)
    return jnp.swapaxes(h, 1, 2).astype(v.dtype), MLSTMState(c_T, n_T, m_T)
