"""Context parallelism: one mLSTM call whose time axis is split over a mesh axis
(docs/context_parallel.md).

Inside `jax.shard_map`, device d of the axis `context_axis` holds the d-th contiguous block of
positions. The state entering a block is an affine function of the state entering the previous
one, so the sequence is three steps:

  1. summary: each device writes its block into a zero state (one (K x T) @ (T x V) product per
     head, `block_summary`), next to the block's total log decay and its stabiliser map;
  2. combine: the summaries are all-gathered over the axis and every device folds those of the
     devices before it onto the initial state (`compose`, `enter`): the exact entering state;
  3. each device runs the chosen implementation on its block from that state.

Everything is differentiable with plain autodiff: all_gather transposes to a reduce-scatter, so
the backward moves the summaries' cotangents once, the reverse scan of state cotangents. The
communication per call is O(K V) per head and device: (n - 1) summaries in (forward), the same
out (backward), n the axis size; with n == 1 nothing of this runs (the local call is the call).

States are stabilised (C, n, m) with true C* = e^m C. A summary holds its writes stabilised by
their own maximum log weight s (-inf: no write), so every weight formed here is <= 1 and the
entering m is the recurrence's own (from the stabiliser maps), as the unsharded call has it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tfla_jax import gates
from tfla_jax.state import MLSTMState


def check_axis(context_axis) -> int:
    """The size of the bound mesh axis `context_axis`; ValueError naming the argument if it is not
    a str naming an axis of an enclosing `jax.shard_map`."""
    if not isinstance(context_axis, str):
        raise ValueError(f"context_axis: expected None or the name (str) of a mesh axis of the "
                         f"enclosing jax.shard_map, got {context_axis!r}")
    try:
        return lax.axis_size(context_axis)
    except NameError:
        raise ValueError(f"context_axis: {context_axis!r} is not a mesh axis bound here; call "
                         "tfla_jax.mlstm(..., context_axis=name) inside jax.shard_map over a mesh "
                         "with that axis, with T split over it") from None


class Summary(NamedTuple):
    """One block (or several consecutive ones) as a map of the entering state, per (B, H):

        m     -> max(m + G, A)                         stabiliser (G, A: `gates.stabiliser_maps`)
        C*    -> [not cut] e^{decay} C* + e^{s} C      (n alike), C* the unstabilised state

    G, A, s carry no gradient; decay (the sum of the log forget gates) and c, n do.
    cut: a reset or a sequence start inside the block; s = -inf: nothing is written.
    """

    G: jax.Array      # (B, H)
    A: jax.Array      # (B, H)
    cut: jax.Array    # (B, H) bool
    decay: jax.Array  # (B, H), finite
    s: jax.Array      # (B, H)
    c: jax.Array      # (B, H, K, V)
    n: jax.Array      # (B, H, K)


def identity_like(x: Summary) -> Summary:
    """The map that leaves every state as it is."""
    zeros = jnp.zeros_like
    return Summary(zeros(x.G), jnp.full_like(x.A, -jnp.inf), zeros(x.cut), zeros(x.decay),
                   jnp.full_like(x.s, -jnp.inf), zeros(x.c), zeros(x.n))


def _weight(killed, log_w):
    """exp(log_w), exactly 0 where killed; the select comes before the exp (docs/numerics.md)."""
    return jnp.exp(jnp.where(killed, -jnp.inf, log_w))


def compose(first: Summary, second: Summary) -> Summary:
    """The map of `first` followed by `second` (associative)."""
    G, A = gates._compose((first.G, first.A), (second.G, second.A))
    gone1 = (first.s == -jnp.inf) | second.cut             # first's writes do not survive
    gone2 = second.s == -jnp.inf
    t1 = jnp.where(gone1, -jnp.inf, first.s + lax.stop_gradient(second.decay))
    s = lax.stop_gradient(jnp.maximum(t1, jnp.where(gone2, -jnp.inf, second.s)))
    s_safe = jnp.where(s == -jnp.inf, 0.0, s)
    w1 = _weight(gone1, first.s + second.decay - s_safe)
    w2 = _weight(gone2, second.s - s_safe)
    return Summary(G, A, first.cut | second.cut, first.decay + second.decay, s,
                   w1[..., None, None] * first.c + w2[..., None, None] * second.c,
                   w1[..., None] * first.n + w2[..., None] * second.n)


def enter(x: Summary, state: MLSTMState, exp_gate: bool) -> MLSTMState:
    """The state after the blocks of x, entered with `state` (exact recurrent m)."""
    c0, n0, m0 = state
    if exp_gate:
        m = lax.stop_gradient(jnp.maximum(m0 + x.G, x.A))
        w0 = _weight(x.cut, m0 + x.decay - m)    # m0's gradient: <dC0, C0> + <dn0, n0>
    else:
        m = jnp.zeros_like(x.s)
        w0 = _weight(x.cut, x.decay)
    w = _weight(x.s == -jnp.inf, x.s - jnp.where(x.s == -jnp.inf, 0.0, m))
    return MLSTMState(w0[..., None, None] * c0 + w[..., None, None] * x.c,
                      w0[..., None] * n0 + w[..., None] * x.n, m)


def block_summary(k, v, i, f, seg_start, *, input_gate: str) -> Summary:
    """The Summary of one block from its keys, values and raw gates (B, T, H, ...).

    seg_start: None or (B, T) bool (position 0 included: a start there cuts the entering state).
    The writes: C = sum_t e^{a_t - s} k_t v_t^T with a_t = `gates.write_log_weights` and
    s = max a_t; one matmul per head, in the input dtype with float32 accumulation (float32
    inputs at HIGHEST precision), like the kernels' chunk states.
    """
    cdt = gates.compute_dtype(k, v, i, f)
    rows = lambda x: jnp.swapaxes(x.astype(cdt), 1, 2)  # noqa: E731  (B, T, H) -> (B, H, T)
    F = gates.log_forget_gate(rows(f))
    logi = gates.log_input_gate(rows(i), input_gate)
    start = None if seg_start is None else jnp.broadcast_to(seg_start[:, None, :], F.shape)
    reset = F <= gates.RESET_LOG_F if start is None else (F <= gates.RESET_LOG_F) | start
    a, gone = gates.write_log_weights(F, logi, reset)
    s = lax.stop_gradient(jnp.max(jnp.where(gone, -jnp.inf, a), axis=-1))        # (B, H)
    w = _weight(gone | (s[..., None] == -jnp.inf), a - jnp.where(s == -jnp.inf, 0.0, s)[..., None])
    if input_gate == "exp":
        G, A = (x[..., -1] for x in gates.stabiliser_maps(F, logi, start))
    else:
        G, A = jnp.zeros_like(s), jnp.zeros_like(s)
    kw = (k.astype(cdt) * jnp.swapaxes(w, 1, 2)[..., None]).astype(k.dtype)   # (B, T, H, K)
    precision = lax.Precision.HIGHEST if kw.dtype in (jnp.float32, jnp.float64) else None
    c = jnp.einsum("bthk,bthv->bhkv", kw, v.astype(kw.dtype), precision=precision,
                   preferred_element_type=cdt)
    n = jnp.einsum("bthk,bht->bhk", k.astype(cdt), w, precision=lax.Precision.HIGHEST)
    cut = jnp.any(reset, axis=-1)
    decay = jnp.sum(jnp.where(reset, 0.0, F), axis=-1)
    return Summary(G, A, cut, decay, s, c, n)


def _vary(x, axes):
    """x typed as varying over the manual mesh axes `axes` (a no-op where it already is)."""
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return lax.pcast(x, missing, to="varying") if missing else x


def _first_is_start(segment_ids, axis: str, size: int):
    """(B,) bool: the block's first position starts a sequence (its id differs from the last id of
    the previous device's block; never on device 0). One ppermute of B ints."""
    prev = lax.ppermute(segment_ids[:, -1], axis, [(d, d + 1) for d in range(size - 1)])
    return (lax.axis_index(axis) > 0) & (segment_ids[:, 0] != prev)


def mlstm_context(run_local, q, k, v, i, f, *, initial_state, seg_start, segment_ids,
                  input_gate: str, return_state: bool, axis: str, size: int):
    """The sharded call: run_local(q, k, v, i, f, initial_state, seg_start) -> (h, final state)
    runs one block; this wraps it with the summary, combine and final-state broadcast.

    Returns (h of this block, the final state of the whole sequence on every device or None).
    """
    B, _, H, K = q.shape
    V = v.shape[-1]
    cdt = gates.compute_dtype(q, k, v, i, f, *(initial_state or ()))
    if initial_state is None:
        initial_state = MLSTMState(jnp.zeros((B, H, K, V), cdt), jnp.zeros((B, H, K), cdt),
                                   jnp.zeros((B, H), cdt))
    # A replicated state meets blocks that vary over the axis (the XLA forms' scan carries).
    varying = tuple(sorted(jax.typeof(q).manual_axis_type.varying))
    initial_state = MLSTMState(*(_vary(x.astype(cdt), varying) for x in initial_state))
    if size == 1:   # nothing to combine: the local call is the call
        h, final = run_local(q, k, v, i, f, initial_state, seg_start)
        if return_state:   # typed invariant over the axis, as for n > 1 (a 1-device psum)
            final = MLSTMState(*(lax.psum(x, axis) for x in final))
        return h, final
    if segment_ids is not None:
        seg_start = seg_start.at[:, 0].set(_first_is_start(segment_ids, axis, size))
    mine = block_summary(k, v, i, f, seg_start, input_gate=input_gate)
    every = lax.all_gather(mine, axis)                  # leading axis: the devices, in order
    me = lax.axis_index(axis)
    before = identity_like(mine)                        # the blocks before this one, folded
    for j in range(size - 1):                           # n is small: an unrolled, masked fold
        nxt = compose(before, jax.tree.map(lambda x, j=j: x[j], every))
        before = jax.tree.map(lambda a, b, j=j: jnp.where(j < me, a, b), nxt, before)
    entering = enter(before, initial_state, input_gate == "exp")
    h, final = run_local(q, k, v, i, f, entering, seg_start)
    if return_state:   # the last block's final state, on every device (invariant over the axis)
        last = lax.axis_index(axis) == size - 1
        final = MLSTMState(*(lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis)
                             for x in final))
    return h, final
