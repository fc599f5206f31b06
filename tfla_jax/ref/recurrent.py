"""The mLSTM recurrence over time with `jax.lax.scan`: the ground truth (docs/math.md).

The stabiliser m is a numerical device: the function is defined by the unstabilised state
(e^m C, e^m n), so m_t is held constant under differentiation (`stop_gradient`). The gradient is
then exact up to the eps term, matches every chunkwise/tiled backward, and stays finite for
extreme gates.
"""

import jax.numpy as jnp
from jax import lax

from tfla_jax import gates
from tfla_jax.state import MLSTMState


def zero_state(batch: int, heads: int, dk: int, dv: int, dtype=jnp.float32) -> MLSTMState:
    """The default initial state (C_0, n_0, m_0) = 0."""
    return MLSTMState(
        c=jnp.zeros((batch, heads, dk, dv), dtype),
        n=jnp.zeros((batch, heads, dk), dtype),
        m=jnp.zeros((batch, heads), dtype),
    )


def mlstm_step_ref(q, k, v, i, f, state: MLSTMState, *, input_gate="exp", normalize=True,
                   scale=None, eps=1e-6, start=None):
    """One step of the recurrence.

    q, k: (B, H, K); v: (B, H, V); i, f: (B, H) raw gate pre-activations;
    state: MLSTMState (c (B,H,K,V), n (B,H,K), m (B,H)); start: None or (B,) bool, True where a
    new sequence starts at this step (the state before it is zero).
    Returns h (B, H, V) in v's dtype and the new state (float32, float64 for float64 inputs).
    """
    cdt = gates.compute_dtype(q, k, v, i, f, *state)
    out_dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.astype(cdt) * scale
    k, v, i, f = (x.astype(cdt) for x in (k, v, i, f))
    c, n, m = (x.astype(cdt) for x in state)
    if start is not None:
        keep = jnp.logical_not(start)[:, None]                      # (B, 1)
        c = jnp.where(keep[..., None, None], c, 0.0)
        n, m = jnp.where(keep[..., None], n, 0.0), jnp.where(keep, m, 0.0)
    if input_gate != "exp":
        m = jnp.zeros_like(m)
    F = gates.log_forget_gate(f)
    logi = gates.log_input_gate(i, input_gate)
    m_new = gates.stabiliser_step(F, m, logi) if input_gate == "exp" else jnp.zeros_like(m)
    f_act = gates.forget_weight(F, m, m_new)
    i_act = jnp.exp(logi - m_new)
    c = f_act[..., None, None] * c + i_act[..., None, None] * (k[..., :, None] * v[..., None, :])
    n = f_act[..., None] * n + i_act[..., None] * k
    num = jnp.einsum("bhk,bhkv->bhv", q, c)
    den = jnp.einsum("bhk,bhk->bh", q, n)
    h = gates.normalized_output(num, den, gates.denominator_floor(m_new, input_gate), normalize, eps)
    return h.astype(out_dtype), MLSTMState(c, n, m_new)


def mlstm_recurrent(q, k, v, i, f, *, input_gate="exp", normalize=True, initial_state=None,
                    scale=None, eps=1e-6, seg_start=None):
    """The mLSTM over a sequence with `lax.scan`.

    q, k: (B, T, H, K); v: (B, T, H, V); i, f: (B, T, H); seg_start: None or (B, T) bool, True
    where a new sequence starts (packed sequences: the state before it is zero).
    Returns h (B, T, H, V) in v's dtype and the final MLSTMState.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = gates.compute_dtype(q, k, v, i, f, *(initial_state or ()))
    if initial_state is None:
        initial_state = zero_state(B, H, K, V, cdt)
    initial_state = MLSTMState(*(x.astype(cdt) for x in initial_state))

    def step(state, x):
        *x, start = x
        h, state = mlstm_step_ref(*x, state, input_gate=input_gate, normalize=normalize,
                                  scale=scale, eps=eps, start=start)
        return state, h

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, i, f))
    xs = (*xs, None if seg_start is None else jnp.moveaxis(seg_start, 1, 0))
    state, h = lax.scan(step, initial_state, xs)
    return jnp.moveaxis(h, 0, 1), state
