"""The chunkwise mLSTM form in pure JAX (docs/math.md): the XLA backend and the kernels' blueprint.

It consumes the same gate vectors (`gates.chunk_gates`) and intra-chunk weights
(`gates.intra_log_weights`) as the kernels. Memory O(T L + NC K V); no Python loop over T or
chunks. Any T (padded internally so that the final state stays exact) and any power-of-two L.
"""

import jax.numpy as jnp
from jax import lax

from tfla_jax import gates
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


def gate_rows(i, f, *, chunk_size, input_gate, m0, scale, dtype=jnp.float32,
              seg_start=None) -> gates.ChunkGates:
    """ChunkGates of raw gates i, f: (B, T, H), T a multiple of chunk_size; fields (B, H, ...).
    seg_start: None or (B, T) bool, True where a packed sequence starts."""
    B, T, H = i.shape
    L = chunk_size
    per_chunk = lambda x: jnp.swapaxes(x.astype(dtype), 1, 2).reshape(B, H, T // L, L)  # noqa: E731
    F = gates.log_forget_gate(per_chunk(f))
    logi = gates.log_input_gate(per_chunk(i), input_gate)
    if seg_start is not None:
        seg_start = jnp.broadcast_to(seg_start.reshape(B, 1, T // L, L), F.shape)
    return gates.chunk_gates(F, logi, m0.astype(dtype), exp_gate=input_gate == "exp",
                             scale=scale, seg_start=seg_start)


def pad_starts(seg_start, chunk_size: int):
    """seg_start (B, T) padded like `pad_to_chunks` (no start in the padding); None stays None."""
    if seg_start is None:
        return None
    return jnp.pad(seg_start, ((0, 0), (0, -seg_start.shape[1] % chunk_size)))


def mlstm_chunkwise(q, k, v, i, f, *, input_gate="exp", normalize=True, initial_state=None,
                    scale=None, eps=1e-6, chunk_size=64, seg_start=None):
    """Chunkwise form. Shapes as `mlstm_recurrent`; returns h and the final MLSTMState."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    L = chunk_size
    cdt = gates.compute_dtype(q, k, v, i, f, *(initial_state or ()))
    scale = K ** -0.5 if scale is None else scale
    if initial_state is None:
        initial_state = zero_state(B, H, K, V, cdt)
    c0, n0, m0 = (x.astype(cdt) for x in initial_state)
    if input_gate != "exp":
        m0 = jnp.zeros_like(m0)

    q, k, v, i, f = pad_to_chunks(q, k, v, i, f, L)
    NC = q.shape[1] // L
    gt = gate_rows(i, f, chunk_size=L, input_gate=input_gate, m0=m0, scale=scale, dtype=cdt,
                   seg_start=pad_starts(seg_start, L))

    def to_chunks(x):  # (B, NC*L, H, ...) -> (B, H, NC, L, ...)
        x = x.astype(cdt).reshape(B, NC, L, H, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    per_chunk = lambda x: x.reshape(B, H, NC, L)  # noqa: E731
    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)

    # Inter-chunk recurrence: every chunk's own contribution in parallel, then a cheap scan.
    kw = kc * per_chunk(gt.w_state)[..., None]
    c_chunk = jnp.einsum("bhclk,bhclv->bhckv", kw, vc)              # [B, H, NC, K, V]
    n_chunk = jnp.sum(kw, axis=-2)                                  # [B, H, NC, K]

    def combine(state, x):
        c, n = state
        decay, c_k, n_k = x
        return (decay[..., None, None] * c + c_k, decay[..., None] * n + n_k), state

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (gt.decay, c_chunk, n_chunk))
    (c_T, n_T), prev = lax.scan(combine, (c0, n0), xs)
    c_prev, n_prev = (jnp.moveaxis(x, 0, 2) for x in prev)          # states entering each chunk

    # Intra-chunk (quadratic in L) combined with the inter-chunk term.
    bh, row, col = per_chunk(gt.bh), per_chunk(gt.row), per_chunk(gt.col)
    pos = jnp.arange(L)
    mask = gates.intra_mask(pos, pos, gt.start.reshape(B, H, NC, L))
    P = gates.masked_exp(gates.intra_log_weights(bh, row, bh, col), mask)  # [B, H, NC, L, L]
    S = jnp.einsum("bhctk,bhcsk->bhcts", qc, kc) * P
    w_inter = per_chunk(gt.w_inter)
    num = w_inter[..., None] * jnp.einsum("bhctk,bhckv->bhctv", qc, c_prev) + S @ vc
    den = w_inter * jnp.einsum("bhctk,bhck->bhct", qc, n_prev) + jnp.sum(S, axis=-1)
    h = gates.normalized_output(num, den, per_chunk(gt.floor), normalize, eps)
    h = jnp.moveaxis(h, 1, 3).reshape(B, NC * L, H, V)[:, :T].astype(v.dtype)
    return h, MLSTMState(c_T, n_T, gt.m_states[..., -1])
