"""The Mosaic GPU backend on the CPU: its kernels interpreted (the chunk-state kernel in both
directions, the forward output kernel, dv and dq) against float64 formulas, and the backward's
wiring against the Triton backend's kernels (every kernel is cross-lowered for CUDA in
tests/test_lowering.py and compiled on the GPU in tests/test_gpu.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.utils import rel_err
from tfla_jax.backends.mosaic.states import state_recurrence


def _reference(a, b, w, w2, decay, x0, y0, L, reverse):
    a, b, w, w2 = (np.asarray(x, np.float64) for x in (a, b, w, w2))
    decay = np.asarray(decay, np.float64)
    x, y = np.asarray(x0, np.float64), np.asarray(y0, np.float64)
    NC = a.shape[1] // L
    xs, ys = [None] * (NC + 1), [None] * (NC + 1)
    for c in (range(NC - 1, -1, -1) if reverse else range(NC)):
        xs[c + 1 if reverse else c], ys[c + 1 if reverse else c] = x, y
        rows = slice(c * L, (c + 1) * L)
        aw = a[:, rows] * np.swapaxes(w[:, :, rows], 1, 2)[..., None]
        aw2 = a[:, rows] * np.swapaxes(w2[:, :, rows], 1, 2)[..., None]
        x = decay[:, :, c, None, None] * x + np.einsum("bthk,bthv->bhkv", aw, b[:, rows])
        y = decay[:, :, c, None] * y + aw2.sum(1)
    xs[0 if reverse else NC], ys[0 if reverse else NC] = x, y
    return np.stack(xs, 2), np.stack(ys, 2), x


@pytest.mark.parametrize("reverse", [False, True])
# (dtype, K, V, block_v, warpgroups): one compute warpgroup (both dtypes), two along K (sharing
# b), two along V, one where two would fit.
@pytest.mark.parametrize("dtype,K,V,block_v,warpgroups", [
    (jnp.bfloat16, 64, 128, None, 2), (jnp.float16, 64, 128, None, 2),
    (jnp.bfloat16, 128, 64, None, 2), (jnp.bfloat16, 64, 128, 64, 2),
    (jnp.bfloat16, 128, 64, None, 1)])
def test_state_recurrence_interpreted(reverse, dtype, K, V, block_v, warpgroups):
    B, T, H, L = 1, 256, 2, 64
    ks = jax.random.split(jax.random.key(3), 7)
    a = jax.random.normal(ks[0], (B, T, H, K), dtype)
    b = jax.random.normal(ks[1], (B, T, H, V), dtype)
    w = jax.random.uniform(ks[2], (B, H, T))
    w2 = jax.random.normal(ks[3], (B, H, T))
    decay = jax.random.uniform(ks[4], (B, H, T // L)).at[0, 1, 2].set(0.0)   # a reset
    x0 = jax.random.normal(ks[5], (B, H, K, V))
    y0 = jax.random.normal(ks[6], (B, H, K))
    xs, ys, last = state_recurrence(a, b, w, w2, decay, x0, y0, reverse=reverse, chunk_size=L,
                                    block_v=block_v, warpgroups=warpgroups, interpret=True)
    rxs, rys, rlast = _reference(a, b, w, w2, decay, x0, y0, L, reverse)
    # bf16 states and the bf16 / fp16 operand (w a) bound the error; y is float32 throughout.
    assert rel_err(xs, rxs) < 5e-3
    assert rel_err(last, rlast) < 5e-3
    assert rel_err(ys, rys) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
def test_decays_of_many_chunks_arrive_in_pieces_interpreted(reverse, monkeypatch):
    """More chunks than one TMA copy moves (256 on the GPU; 4 here, so that 10 chunks, padded
    to 12 decays, arrive in three pieces): every state still matches the recurrence."""
    from tfla_jax.backends.mosaic import states

    monkeypatch.setattr(states, "TMA_BOX", 4)
    B, T, H, K, V, L = 1, 640, 1, 64, 64, 64
    ks = jax.random.split(jax.random.key(6), 7)
    a = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    b = jax.random.normal(ks[1], (B, T, H, V), jnp.bfloat16)
    w, w2 = jax.random.uniform(ks[2], (B, H, T)), jax.random.normal(ks[3], (B, H, T))
    decay = jax.random.uniform(ks[4], (B, H, T // L), minval=0.5).at[0, 0, 9].set(0.0)
    x0, y0 = jax.random.normal(ks[5], (B, H, K, V)), jax.random.normal(ks[6], (B, H, K))
    xs, ys, last = state_recurrence(a, b, w, w2, decay, x0, y0, reverse=reverse, chunk_size=L,
                                    warpgroups=1, interpret=True)
    rxs, rys, rlast = _reference(a, b, w, w2, decay, x0, y0, L, reverse)
    assert rel_err(xs, rxs) < 5e-3 and rel_err(last, rlast) < 5e-3 and rel_err(ys, rys) < 1e-5


# Two warpgroups read C_c from GMEM; one has it prefetched by TMA (L = 128: two sub-blocks
# a chunk, so the prefetch runs ahead of the boundary).
@pytest.mark.parametrize("K,V,block_v,warpgroups,L", [(128, 64, None, 2, 64),
                                                      (64, 128, 64, 2, 64),
                                                      (64, 128, None, 1, 128)])
def test_carried_terms_interpreted(K, V, block_v, warpgroups, L):
    """The reverse recurrence's decay_c <C_c, X_{c+1}> per K row (summed over V tiles)."""
    B, T, H = 1, 256 if L == 64 else 512, 2
    ks = jax.random.split(jax.random.key(4), 8)
    a = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    b = jax.random.normal(ks[1], (B, T, H, V), jnp.bfloat16)
    w, w2 = jax.random.uniform(ks[2], (B, H, T)), jax.random.normal(ks[3], (B, H, T))
    decay = jax.random.uniform(ks[4], (B, H, T // L)).at[0, 1, 2].set(0.0)
    x0, y0 = jax.random.normal(ks[5], (B, H, K, V)), jax.random.normal(ks[6], (B, H, K))
    c = jax.random.normal(ks[7], (B, H, T // L + 1, K, V), jnp.bfloat16)
    xs, ys, last, z = state_recurrence(a, b, w, w2, decay, x0, y0, reverse=True, chunk_size=L,
                                       block_v=block_v, warpgroups=warpgroups, carried=c,
                                       interpret=True)
    rxs, _, _ = _reference(a, b, w, w2, decay, x0, y0, L, reverse=True)
    # decay_c sum_v C_c X_{c+1}, X from the float64 recurrence: the kernel's float32 carry
    # differs from it as its states do (bf16 operands (w a)), hence the states' bound.
    want = (np.asarray(decay, np.float64)[..., None]
            * np.einsum("bhckv,bhckv->bhck", np.asarray(c, np.float64)[:, :, :-1], rxs[:, :, 1:]))
    got = np.asarray(z, np.float64).sum(2)
    err = rel_err(got, want)
    assert z.shape == (B, H, V // (block_v or V), T // L, K)
    assert err < 5e-3, err


def _backward_call():
    """Inputs of `MosaicBackend.backward` (bf16, two chunks of 128) and a runner taking config
    overrides."""
    import dataclasses

    from tfla_jax import ref
    from tfla_jax.backends import NormTerms, get_backend
    from tfla_jax.backends.mosaic import MosaicConfig

    B, T, H, K, V, L = 1, 256, 2, 64, 128, 128
    ks = jax.random.split(jax.random.key(5), 11)
    q, k = (jax.random.normal(ks[j], (B, T, H, K), jnp.bfloat16) for j in (0, 1))
    v, dh = (jax.random.normal(ks[j], (B, T, H, V), jnp.bfloat16) for j in (2, 3))
    i, f = jax.random.normal(ks[4], (B, T, H)), jax.random.normal(ks[5], (B, T, H)) + 3.0
    c0, dc_T = (jax.random.normal(ks[j], (B, H, K, V)) for j in (6, 7))
    n0, dn_T = (jax.random.normal(ks[j], (B, H, K)) for j in (8, 9))
    gt = ref.gate_rows(i, f, chunk_size=L, input_gate="exp", m0=jnp.zeros((B, H)),
                       scale=K ** -0.5)
    states = state_recurrence(k, v, gt.w_state, gt.w_state, gt.decay, c0, n0, reverse=False,
                              chunk_size=L, interpret=True)
    norm = NormTerms(jax.random.uniform(ks[10], (B, H, T), minval=0.5, maxval=2.0),
                     jax.random.normal(ks[10], (B, H, T)))
    mosaic = get_backend("pallas_mosaic_gpu")
    cfg = MosaicConfig.default(K, V, T, jnp.bfloat16, chunk_size=L, heads=B * H)

    def run(**overrides):
        return mosaic.backward(q, k, v, gt, c0, n0, None, dh, dc_T, dn_T, norm, states,
                               config=dataclasses.replace(cfg, **overrides), interpret=True)
    return run


def test_mosaic_state_grads_match_triton_interpreted(monkeypatch):
    """`MosaicConfig.mosaic_state_grads`: on kept states, the state cotangents and the forget
    gate's carried terms that `MosaicBackend.backward` hands to the dq / dk / dv kernels equal
    those of the Triton state-grads path (both interpreted; the Triton dq / dk / dv that follow
    are the same call in both, so they are recorded instead of run)."""
    from tfla_jax.backends import get_backend
    run = _backward_call()
    monkeypatch.setattr(get_backend("pallas_triton"), "intra_grads", lambda *a, **kw: a[6:9])
    handed = [run(mosaic_state_grads=on, mosaic_dv=False, mosaic_dq=False, mosaic_dk=False)
              for on in (False, True)]
    names = ["C", "n", "C_T", "dC", "dn", "dC_0", "zc"]
    for name, a, b in zip(names, jax.tree.leaves(handed[0]), jax.tree.leaves(handed[1])):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = rel_err(b, a)
        assert err < 1e-3, f"{name}: {err:.2e}"


def _suffix_sums(r, L):
    """sum_{t <= t' in the chunk} r_t': how the forget-gate gradient takes r (docs/math.md)."""
    r = np.asarray(r, np.float64)
    r = r.reshape(*r.shape[:-1], -1, L)[..., ::-1]
    return np.cumsum(r, -1)[..., ::-1].reshape(*r.shape[:-2], -1)


def test_mosaic_dq_dk_dv_match_triton_interpreted():
    """The default (bf16, V <= 256, unpadded head dims: dv, dq and dk on Mosaic): every field of
    the backward's `KernelGrads` equals the one with Triton's dq, dk and dv kernels (both
    interpreted), the row dots of the forget-gate gradient included."""
    run = _backward_call()
    want, got = run(mosaic_dv=False, mosaic_dq=False, mosaic_dk=False), run()
    for name, a, b in zip(want._fields, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = rel_err(a, b)
        assert err < (5e-3 if name in ("dq", "dk", "dv") else 1e-3), f"{name}: {err:.2e}"


def test_score_blocks_round_dq_and_dk_alike_interpreted(monkeypatch):
    """`mosaic_dk`, with the score in two V blocks (the V > 256 case, here V = 128 in blocks of
    64): every gradient stays at Triton's to bf16 rounding, and dq and dk round dA alike, so
    the in-chunk suffix sums of r (the forget-gate gradient's terms) stay near Triton's
    one-block ones: 3.1e-3 here, against 8.5e-3 with the split dq beside Triton's dk (measured
    with this seed; bf16 rounding of dA is ~2e-3)."""
    from tfla_jax.backends.mosaic import bwd
    run = _backward_call()
    want = run(mosaic_dv=False, mosaic_dq=False, mosaic_dk=False)
    monkeypatch.setattr(bwd, "MAX_SCORE_BLOCK", 64)
    got = run(mosaic_dk=True)
    err = rel_err(_suffix_sums(got.r, 128), _suffix_sums(want.r, 128))
    assert err < 5e-3, err
    for name in ("dq", "dk", "dv", "kdk_inter", "kdk", "zc", "dc0", "dn0"):
        err = rel_err(getattr(got, name), getattr(want, name))
        assert err < 5e-3, f"{name}: {err:.2e}"


# ---------------------------------------------------------------------------------------------
# The warp-specialised output, dv and dq kernels, interpreted (three warpgroups: PJRT_NPROC,
# tests/conftest.py) against the formulas of docs/kernels.md in float64.
# ---------------------------------------------------------------------------------------------

def _kernel_inputs(seed, T, K, V, L, seg=37):
    """bf16 q, k, v, dh (1, T, 1, D), gate rows (1, 1, T) float32 (a segment starts at row
    `seg` of every chunk), states and vectors (1, 1, NC+1, ...)."""
    r = np.random.default_rng(seed)
    NC = T // L
    q, k = (jnp.asarray(r.normal(size=(1, T, 1, K)), jnp.bfloat16) for _ in range(2))
    v, dh = (jnp.asarray(r.normal(size=(1, T, 1, V)), jnp.bfloat16) for _ in range(2))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    pos = np.arange(T) % L
    rows = dict(bh=f32(np.cumsum(-r.uniform(0, 0.1, T))), row=f32(-r.uniform(0, 1, T)),
                col=f32(-r.uniform(0, 1, T)), start=jnp.asarray(np.where(pos >= seg, seg, 0),
                                                                 jnp.int32),
                inv_n=f32(r.uniform(0.5, 1.5, T)), dden=f32(r.normal(size=T) * 0.1),
                w_inter=f32(r.uniform(0, 1, T)), w_state=f32(r.uniform(0, 1, T)),
                floor=f32(r.uniform(0, 2, T)))
    rows = {n: x.reshape(1, 1, T) for n, x in rows.items()}
    c = jnp.asarray(r.normal(size=(1, 1, NC + 1, K, V)) * 0.1, jnp.bfloat16)
    n = f32(r.normal(size=(1, 1, NC + 1, K)))
    return q, k, v, dh, rows, c, n


def _chunks(T, L):
    """Per chunk: the row slice and P (L, L) with P[t, s] = exp(log P) on start_t <= s <= t."""
    for c in range(T // L):
        yield c, slice(c * L, (c + 1) * L)


def _gate_matrix(rows, sl, L, strict=False):
    g = {n: np.asarray(x, np.float64)[0, 0, sl] for n, x in rows.items()}
    t = np.arange(L)
    log_p = (g["bh"][:, None] - g["bh"][None]) + g["row"][:, None] + g["col"][None]
    causal = t[None] < t[:, None] if strict else t[None] <= t[:, None]
    return np.where(causal & (t[None] >= g["start"][:, None]), np.exp(log_p), 0.0), g


def _f64(*xs):
    """Float64 copies: (1, T, 1, D) -> (T, D); states (1, 1, NC+1, ...) -> (NC+1, ...)."""
    xs = [np.asarray(x, np.float64) for x in xs]
    return [x[0, :, 0] if x.shape[1] > 1 else x[0, 0] for x in xs]


@pytest.mark.parametrize("normalize", [True, False])
def test_output_kernel_interpreted(normalize):
    """h and den of the forward output kernel (two chunks, a segment start inside each)."""
    from tfla_jax.backends.mosaic.fwd import chunk_output
    T, K, V, L, eps = 256, 64, 128, 128, 1e-6
    q, k, v, _, rows, c, n = _kernel_inputs(1, T, K, V, L)
    h, den = chunk_output(q, k, v, c, n, rows, rows, chunk_size=L, normalize=normalize,
                          eps=eps, interpret=True)
    qf, kf, vf, cf, nf = _f64(q, k, v, c, n)
    want_h, want_den = np.zeros((T, V)), np.zeros(T)
    for ci, sl in _chunks(T, L):
        P, g = _gate_matrix(rows, sl, L)
        S = (qf[sl] @ kf[sl].T) * P
        want_h[sl] = g["w_inter"][:, None] * (qf[sl] @ cf[ci]) + S @ vf[sl]
        want_den[sl] = g["w_inter"] * (qf[sl] @ nf[ci]) + S.sum(1)
        if normalize:
            want_h[sl] /= (np.maximum(np.abs(want_den[sl]), g["floor"]) + eps)[:, None]
    assert rel_err(np.asarray(h, np.float64)[0, :, 0], want_h) < 1e-2
    assert rel_err(np.asarray(den, np.float64)[0, 0], want_den) < 1e-2


def test_dv_kernel_interpreted():
    """dv_s = w_state_s k_s dC_{c+1} + sum_{t >= s >= start_t} (k_s . q_t) P_ts inv_n_t dh_t."""
    from tfla_jax.backends.mosaic.fwd import chunk_dv
    T, K, V, L = 256, 64, 128, 128
    q, k, _, dh, rows, dc, _ = _kernel_inputs(2, T, K, V, L)
    dv = chunk_dv(q, k, dh, dc, rows, rows, chunk_size=L, interpret=True)
    qf, kf, dhf, dcf = _f64(q, k, dh, dc)
    want = np.zeros((T, V))
    for ci, sl in _chunks(T, L):
        P, g = _gate_matrix(rows, sl, L)
        S = (qf[sl] @ kf[sl].T) * P * g["inv_n"][:, None]
        want[sl] = g["w_state"][:, None] * (kf[sl] @ dcf[ci + 1]) + S.T @ dhf[sl]
    assert rel_err(np.asarray(dv, np.float64)[0, :, 0], want) < 1e-2


def _run_grad_kernel(which, seed, score_block, monkeypatch, T=256, K=64, V=128, L=128):
    """bwd.chunk_dq / chunk_dk interpreted on `_kernel_inputs` (score_block: patched V block),
    and the inputs in float64."""
    from tfla_jax.backends.mosaic import bwd
    if score_block:
        monkeypatch.setattr(bwd, "MAX_SCORE_BLOCK", score_block)
    q, k, v, dh, rows, c, n = _kernel_inputs(seed, T, K, V, L)
    got = getattr(bwd, f"chunk_{which}")(q, k, v, dh, c, n, rows, rows, chunk_size=L,
                                         interpret=True)
    return got, rows, _f64(q, k, v, dh, c, n)


@pytest.mark.parametrize("score_block", [None, 64])   # 64: V = 128 in two score blocks
def test_dq_kernel_interpreted(score_block, monkeypatch):
    """dq and q . dq without the diagonal term (see tfla_jax/backends/mosaic/bwd.py)."""
    T, K, L = 256, 64, 128
    (dq, qdq), rows, (qf, kf, vf, dhf, cf, nf) = _run_grad_kernel("dq", 3, score_block, monkeypatch)
    want, want_qdq = np.zeros((T, K)), np.zeros(T)
    for ci, sl in _chunks(T, L):
        P, g = _gate_matrix(rows, sl, L, strict=True)
        dS = dhf[sl] @ vf[sl].T * g["inv_n"][:, None] + g["dden"][:, None]
        off = (dS * P) @ kf[sl] + g["w_inter"][:, None] * (
            g["inv_n"][:, None] * (dhf[sl] @ cf[ci].T) + g["dden"][:, None] * nf[ci][None])
        want_qdq[sl] = (qf[sl] * off).sum(1)
        d_diag = np.diagonal(dS) * np.exp(g["row"] + g["col"])
        want[sl] = off + d_diag[:, None] * kf[sl]
    assert rel_err(np.asarray(dq, np.float64)[0, :, 0], want) < 1e-2
    assert rel_err(np.asarray(qdq, np.float64)[0, 0], want_qdq) < 1e-2


@pytest.mark.parametrize("score_block", [None, 64])   # 64: V = 128 in two score blocks
def test_dk_kernel_interpreted(score_block, monkeypatch):
    """dk and its three row dots (see `bwd.chunk_dk`)."""
    T, K, L = 256, 64, 128
    got, rows, (qf, kf, vf, dhf, dcf, dnf) = _run_grad_kernel("dk", 4, score_block, monkeypatch)
    want = np.zeros((T, K)), np.zeros(T), np.zeros(T), np.zeros(T)
    for ci, sl in _chunks(T, L):
        P, g = _gate_matrix(rows, sl, L, strict=True)
        dS = dhf[sl] @ vf[sl].T * g["inv_n"][:, None] + g["dden"][:, None]
        intra = (dS * P).T @ qf[sl]
        inter = g["w_state"][:, None] * (vf[sl] @ dcf[ci + 1].T + dnf[ci + 1][None])
        d_diag = np.diagonal(dS) * np.exp(g["row"] + g["col"])
        dk = intra + inter + d_diag[:, None] * qf[sl]
        want[0][sl] = dk
        for out, x in zip(want[1:], (intra, inter, dk)):
            out[sl] = (kf[sl] * x).sum(1)
    assert rel_err(np.asarray(got[0], np.float64)[0, :, 0], want[0]) < 1e-2
    for name, a, b in zip(("kdk_off", "kdk_inter", "kdk"), got[1:], want[1:]):
        assert rel_err(np.asarray(a, np.float64)[0, 0], b) < 1e-2, name
