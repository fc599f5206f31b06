"""The gate, stabiliser and decay math shared by every mLSTM form (docs/math.md, docs/numerics.md).

Everything here is plain jnp: the references call it in XLA, the kernel policy calls it to build
the per-position gate vectors the kernels consume, and the kernels call `intra_weights` inside
their bodies. All of it runs in float32 (float64 for float64 inputs).

Chunkwise terms for chunk c (positions cL .. cL+L-1, local index tau), F = log f, log i:
    b_tau = sum_{s<=tau} F_s        inclusive in-chunk cumsum, kept as hi + lo (compensated)
    g     = b_{L-1}                  log decay over the whole chunk
    a_tau = sum_{s>tau} F_s + log i_tau
    m_tau                            the recurrent stabiliser at that position (exact row max)
    m_c                              the stabiliser of the state entering chunk c
and the weights (all <= 1 up to rounding, so nothing overflows):
    intra    P_{tau,s} = scale exp(b_tau - b_s + log i_s - m_tau)            (s <= tau)
    inter    w_inter_tau = scale exp(b_tau + m_c - m_tau)
    state    w_state_tau = exp(a_tau - m_{c+1}),   decay_c = exp(g + m_c - m_{c+1})
    floor_tau = exp(-m_tau) (exp gate) or 1 (sigmoid gate)
b_tau - b_s is formed as (bh_tau - bh_s) + (bl_tau - m_tau + log scale) + (log i_s - bl_s): the hi
parts cancel exactly where they are close, so the error is that of the difference itself, not
ulp(L |F|) (docs/numerics.md).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Log forget gates are clamped here: exp(-1e30) is 0 in every float format, and the clamp keeps
# chunk sums of up to 2^24 gates finite; it is invisible unless |i~| or |m0| reach ~1e29.
LOG_F_MIN = -1e30
# A log forget gate at or below this is a hard reset, f' = 0 exactly, in every form (e^-4096 is 0 in
# every float format; only a stabiliser could carry it). Excluding resets from the chunkwise
# cumsums keeps them below 2^24 for L <= 4096, where the hi + lo pair resolves them exactly.
RESET_LOG_F = -4096.0
# Positions appended to reach a whole chunk: the forget gate keeps (log_sigmoid(F_PAD) == 0
# exactly) and the input gate writes nothing (log i = -inf), so the final state stays exact.
F_PAD = 1e4
I_PAD = -jnp.inf
LOG2E = 1.4426950408889634


def compute_dtype(*arrays) -> jnp.dtype:
    """float64 when any input is float64, else float32: the dtype of all gate/state math."""
    if any(a is not None and a.dtype == jnp.float64 for a in arrays):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def log_forget_gate(f: jax.Array) -> jax.Array:
    """F = max(logsig(f~), LOG_F_MIN) <= 0; f~ = -inf (a hard reset) gives LOG_F_MIN."""
    return jnp.maximum(jax.nn.log_sigmoid(f), LOG_F_MIN)


def forget_weight(F, m_prev, m_new):
    """f'_t = exp(F_t + m_{t-1} - m_t), exactly 0 at a hard reset (F <= RESET_LOG_F)."""
    return jnp.exp(jnp.where(F <= RESET_LOG_F, -jnp.inf, F + m_prev - m_new))


def log_input_gate(i: jax.Array, input_gate: str) -> jax.Array:
    """log i' before stabilisation: i~ (exp) or logsig(i~) (sigmoid); -inf means no input."""
    return i if input_gate == "exp" else jax.nn.log_sigmoid(i)


def denominator_floor(m: jax.Array, input_gate: str) -> jax.Array:
    """Lower bound of |den|: exp(-m) for the stabilised exp gate, 1 for the sigmoid gate."""
    return jnp.exp(-m) if input_gate == "exp" else jnp.ones_like(m)


def normalized_output(num, den, floor, normalize: bool, eps: float):
    """h = num / (max(|den|, floor) + eps); num when normalize is off. num: [..., V], den: [...]."""
    if not normalize:
        return num
    return num / (jnp.maximum(jnp.abs(den), floor) + eps)[..., None]


def stabiliser_step(F, m_prev, logi):
    """m_t = max(F_t + m_{t-1}, log i_t): the recurrent stabiliser (no gradient)."""
    return lax.stop_gradient(jnp.maximum(F + m_prev, logi))


def _compose(first, second):
    """Composition of the maps x -> max(x + F, A): first, then second (associative)."""
    F1, A1 = first
    F2, A2 = second
    return F1 + F2, jnp.maximum(A1 + F2, A2)


def _two_sum_add(x, y):
    """(hi, lo) + (hi, lo) in double-float arithmetic (Knuth's TwoSum, then renormalised)."""
    s = x[0] + y[0]
    t = s - x[0]
    err = (x[0] - (s - t)) + (y[0] - t)
    lo = err + (x[1] + y[1])
    hi = s + lo
    return hi, lo - (hi - s)


def compensated_cumsum(x, axis=-1):
    """Inclusive cumsum along axis as (hi, lo), hi + lo accurate to ~ulp of the sum itself."""
    return lax.associative_scan(_two_sum_add, (x, jnp.zeros_like(x)), axis=axis)


def segment_log_decay(F):
    """P[..., t, s] = sum_{s < r <= t} F_r for s <= t (0 above the diagonal). F: [..., T].

    A masked cumulative sum inside the window (O(T^2)): the quadratic form's decay matrix.
    """
    T = F.shape[-1]
    r = jnp.arange(T)
    after_s = r[None, :] > r[:, None]                               # [s, r]
    P = jnp.cumsum(jnp.where(after_s, F[..., None, :], 0.0), axis=-1)  # [..., s, t]
    return jnp.swapaxes(P, -1, -2)                                  # [..., t, s]


def stabiliser_maps(F, logi, seg_start=None):
    """The stabiliser as a map of the previous one, m_t = max(m + G_t, A_t), for every prefix of
    the last axis (inclusive associative scan of x -> max(x + F, log i); no gradient).

    A sequence start is the constant map x -> max(0 + F_t, log i_t) (the zero state's m = 0):
    G = -inf from there on. A_t alone is the stabiliser of the writes, -inf where none reaches t.
    """
    F_m, A_m = F, logi
    if seg_start is not None:
        F_m = jnp.where(seg_start, -jnp.inf, F)
        A_m = jnp.where(seg_start, jnp.maximum(F, logi), logi)
    G, A = lax.associative_scan(_compose, (F_m, A_m), axis=-1)
    return lax.stop_gradient(G), lax.stop_gradient(A)


def write_log_weights(F, logi, reset):
    """(a, cut): a_tau = sum_{tau<s<=end} F_s + log i_tau, the log weight of position tau's write
    in the state at the end of the last axis (resets' F count as 0), and cut_tau: a reset after
    tau (F <= RESET_LOG_F or a sequence start) removes that write. reset: bool like F.

    A reverse sum of non-positive terms: no cancellation, unlike b_end - b_tau."""
    ax = F.ndim - 1
    cut = lax.cummax(reset.astype(jnp.int32), axis=ax, reverse=True) > 0
    cut = jnp.concatenate([cut[..., 1:], jnp.zeros_like(reset[..., :1])], -1)
    F_seg = jnp.where(reset, 0.0, F)
    F_after = jnp.concatenate([F_seg[..., 1:], jnp.zeros_like(F[..., :1])], axis=-1)
    return lax.cumsum(F_after, axis=ax, reverse=True) + logi, cut


class ChunkGates(NamedTuple):
    """Per-position gate vectors of the chunkwise form (see the module docstring), over T = NC L.

    bh, row, col, w_inter, w_state, floor, m_row: [..., T] float; start: [..., T] int32, the
    in-chunk index where the segment of each position starts (0 without a reset);
    decay: [..., NC]; m_states: [..., NC+1] (index 0 the initial stabiliser, NC the final one).
    intra weight of (tau, s): exp((bh_tau - bh_s) + row_tau + col_s) for start_tau <= s <= tau.
    """

    bh: jax.Array
    row: jax.Array
    col: jax.Array
    start: jax.Array
    w_inter: jax.Array
    w_state: jax.Array
    floor: jax.Array
    decay: jax.Array
    m_row: jax.Array
    m_states: jax.Array


def chunk_gates(F, logi, m0, *, exp_gate: bool, scale: float, seg_start=None) -> ChunkGates:
    """The chunkwise gate vectors. F, logi: [..., NC, L] (float32/64); m0: [...] initial m;
    seg_start: None or [..., NC, L] bool, True where a new sequence starts (packed sequences).

    The stabiliser is the recurrent one (`stabiliser_step`), computed by associative scans
    (in-chunk, then across chunks) and held constant under differentiation. A log forget gate
    <= RESET_LOG_F is a hard reset: every weight across it is exactly 0 (docs/numerics.md).
    A sequence start is a hard reset from the zero state (C, n, m) = 0: the same weights, and the
    stabiliser restarts at m = max(F_t + 0, log i_t), a constant map of the previous m.
    """
    lead, (NC, L) = F.shape[:-2], F.shape[-2:]
    reset = F <= RESET_LOG_F if seg_start is None else (F <= RESET_LOG_F) | seg_start
    idx = lax.broadcasted_iota(jnp.int32, F.shape, F.ndim - 1)
    start = _materialise(lax.cummax(jnp.where(reset, idx, 0), axis=F.ndim - 1))
    reset_before = _materialise(lax.cummax(reset.astype(jnp.int32), axis=F.ndim - 1)) > 0
    F_seg = jnp.where(reset, 0.0, F)                      # keeps |bh| <= L 2^12: lo resolves it
    bh, bl = _materialise(compensated_cumsum(F_seg))
    g = bh[..., -1] + bl[..., -1]                                   # [..., NC]
    a, reset_after = _materialise(write_log_weights(F, logi, reset))
    log_scale = jnp.log(jnp.asarray(scale, F.dtype))
    if exp_gate:
        G, A = _materialise(stabiliser_maps(F, logi, seg_start))    # max_s (b_tau-b_s+logi_s)
        G = jnp.sum(F, -1) if seg_start is None else G[..., -1]    # -inf: a start in the chunk
        G, A = lax.stop_gradient(G), lax.stop_gradient(A)
        G, M = lax.associative_scan(_compose, (G, A[..., -1]), axis=-1)
        m_next = lax.stop_gradient(jnp.maximum(m0[..., None] + G, M))   # [..., NC]
        m_states = jnp.concatenate([m0[..., None], m_next], axis=-1)
        m_prev = m_states[..., :-1, None]
        log_b = (m_prev + lax.stop_gradient(bh)) + lax.stop_gradient(bl)
        m_row = jnp.where(reset_before, A, jnp.maximum(log_b, A))
        # Nothing but the initial state contributes: keep the recurrent's m (the floor needs it).
        m_row = lax.stop_gradient(jnp.where(m_row == -jnp.inf, m_prev + jnp.cumsum(F, -1), m_row))
        log_inter = (m_prev + bh) + bl - m_row
        floor = jnp.exp(-m_row)
    else:
        m_states = jnp.zeros((*lead, NC + 1), F.dtype)
        m_row = jnp.zeros_like(F)
        log_inter = bh + bl
        floor = jnp.ones_like(F)
    m_next = m_states[..., 1:]
    m_prev = m_states[..., :-1]
    flat = lambda x: x.reshape(*lead, NC * L)  # noqa: E731
    return ChunkGates(
        bh=flat(bh),
        row=flat((bl - m_row) + log_scale),
        col=flat(logi - bl),
        start=flat(start),
        w_inter=flat(_masked_exp(reset_before, log_inter + log_scale)),
        w_state=flat(_masked_exp(reset_after, a - m_next[..., None])),
        floor=flat(floor),
        decay=_masked_exp(jnp.any(reset, -1), g + m_prev - m_next),
        m_row=flat(m_row),
        m_states=m_states,
    )


def _materialise(x):
    """x, computed by a kernel of its own. XLA fuses the gate scans into one GPU kernel that
    recomputes their shared terms; with each scan's result materialised the whole gate
    preparation took 0.14-0.15 instead of 0.24 ms (H200, exp gate, B 8, T 8192, H 8)."""
    return lax.optimization_barrier(x)


def _masked_exp(killed, x):
    """exp(x), exactly 0 where killed (masked before the exp, so gradients stay finite)."""
    return jnp.exp(jnp.where(killed, -jnp.inf, x))


def intra_log_weights(bh_q, row_q, bh_kv, col_kv):
    """log P[..., t, s] = (bh_t - bh_s) + row_t + col_s: [..., queries, keys] (before the mask).

    bh_q, row_q: [..., queries]; bh_kv, col_kv: [..., keys] (ChunkGates fields).
    """
    return ((bh_q[..., :, None] - bh_kv[..., None, :]) + row_q[..., :, None]) + col_kv[..., None, :]


def intra_log_weights_t(bh_q, row_q, bh_kv, col_kv):
    """log P^T: [..., keys, queries], built directly (kernels have no register transpose)."""
    return ((bh_q[..., None, :] - bh_kv[..., :, None]) + row_q[..., None, :]) + col_kv[..., :, None]


def intra_mask(q_pos, kv_pos, start_q, strict=False):
    """start_t <= s <= t (s < t if strict): [queries, keys]. q_pos, start_q: [..., queries];
    kv_pos: [..., keys]."""
    causal = (kv_pos[..., None, :] < q_pos[..., :, None]) if strict else (
        kv_pos[..., None, :] <= q_pos[..., :, None])
    return causal & (kv_pos[..., None, :] >= start_q[..., :, None])


def intra_mask_t(q_pos, kv_pos, start_q, strict=False):
    """The transposed mask: [keys, queries]."""
    causal = (kv_pos[..., :, None] < q_pos[..., None, :]) if strict else (
        kv_pos[..., :, None] <= q_pos[..., None, :])
    return causal & (kv_pos[..., :, None] >= start_q[..., None, :])


def diagonal_weight(row, col):
    """P[t, t] = exp(row_t + col_t) (the bh parts cancel on the diagonal). row, col: [..., T]."""
    return jnp.exp2((row + col) * LOG2E)


def masked_exp(log_w, mask):
    """exp(log_w) where mask, else exactly 0. The select comes before the exp: off the mask
    log_w may be large and positive, and exp(inf) would turn autodiff's 0 cotangent into NaN."""
    return jnp.exp2(jnp.where(mask, log_w, -jnp.inf) * LOG2E)
