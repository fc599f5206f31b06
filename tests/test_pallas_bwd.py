"""TFLA backward kernels (tfla_jax/pallas/bwd.py) in interpret mode vs jax.grad of the lax.scan
reference, plus a CUDA cross-lowering of every backward kernel configuration.

The op under test is a local jax.custom_vjp: forward = `ref.mlstm_chunkwise(..., return_residuals=True)` (plain jnp, the
forward residuals) or the Pallas forward, backward = `mlstm_bwd`. Inputs are float32, so the Pallas
dots are exact float32 and every gradient must match to 1e-4 relative RMS, each asserted alone.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfla_jax import MLSTMState, ref
from tfla_jax.pallas.bwd import BwdTilingConfig, mlstm_bwd
from tests.utils import assert_close, make_inputs, random_like, rel_err

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")
TOL = 1e-4


def _forward_reference(q, k, v, i, f, c0, n0, m0, *, gate, normalize, chunk, keep_states):
    h, final, (den, m_row), states = ref.mlstm_chunkwise(
        q, k, v, i, f, initial_state=MLSTMState(c0, n0, m0), input_gate=gate,
        normalize=normalize, chunk_size=chunk, return_residuals=True)
    return h, final, (den, m_row), (states if keep_states else None)


def _forward_pallas(q, k, v, i, f, c0, n0, m0, *, gate, normalize, chunk, keep_states):
    from tfla_jax.pallas import TilingConfig, mlstm_fwd

    cfg = TilingConfig.default(q.shape[-1], v.shape[-1], q.shape[1], q.dtype, gate,
                               chunk_size=chunk)
    h, final, res = mlstm_fwd(q, k, v, i, f, c0, n0, m0, input_gate=gate, normalize=normalize,
                              config=cfg, interpret=True, return_states=keep_states)
    return h, final, res[:2], (res[2:] if keep_states else None)


def make_op(gate, normalize, config, *, keep_states=False, forward=_forward_reference):
    """mLSTM on whole chunks as a custom_vjp whose backward is `mlstm_bwd` (interpret mode).

    Returns f(q, k, v, i, f, c0, n0, m0) -> (h, c_T, n_T, m_T); the cotangent of m_T is
    ignored (m is a stabiliser held constant, as the references' stop_gradient makes it).
    """
    fwd_kw = dict(gate=gate, normalize=normalize, chunk=config.chunk_size,
                  keep_states=keep_states)

    @jax.custom_vjp
    def op(q, k, v, i, f, c0, n0, m0):
        h, final, _, _ = forward(q, k, v, i, f, c0, n0, m0, **fwd_kw)
        return (h, *final)

    def op_fwd(q, k, v, i, f, c0, n0, m0):
        h, final, (den, m_row), states = forward(q, k, v, i, f, c0, n0, m0, **fwd_kw)
        return (h, *final), (q, k, v, i, f, c0, n0, m0, h, den, m_row, states)

    def op_bwd(res, cts):
        q, k, v, i, f, c0, n0, m0, h, den, m_row, states = res
        dh, dc_t, dn_t, _ = cts
        grads = mlstm_bwd(q, k, v, i, f, c0, n0, m0, h, den, m_row, dh, dc_t, dn_t,
                          input_gate=gate, normalize=normalize, config=config, interpret=True,
                          states=states)
        return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v, i, f, c0, n0, m0)))

    op.defvjp(op_fwd, op_bwd)
    return op


def pallas_mlstm(op, chunk, q, k, v, i, f, c0, n0, m0):
    """Any T: pads to whole chunks (q = k = v = 0, i writes nothing, f keeps) and slices h."""
    T = q.shape[1]
    h, c_t, n_t, m_t = op(*ref.pad_to_chunks(q, k, v, i, f, chunk), c0, n0, m0)
    return h[:, :T], MLSTMState(c_t, n_t, m_t)


def reference_mlstm(gate, normalize, q, k, v, i, f, c0, n0, m0):
    return ref.mlstm_recurrent(q, k, v, i, f, input_gate=gate, normalize=normalize,
                               initial_state=MLSTMState(c0, n0, m0))


def _loss(fn, args, cot):
    """<h, dh> + <c_T, dc_T> + <n_T, dn_T>: random cotangents on h and on the final state."""
    h, st = fn(*args)
    return jnp.sum(h * cot[0]) + jnp.sum(st.c * cot[1]) + jnp.sum(st.n * cot[2])


def _grads(fn, args, cot):
    return jax.jit(jax.grad(lambda a: _loss(fn, a, cot)))(args)


def _inputs(seed, B, T, H, K, V, **kw):
    q, k, v, i, f, s = make_inputs(seed, B, T, H, K, V, with_state=True, **kw)
    cot = random_like(seed + 1, (jnp.zeros((B, T, H, V)), s.c, s.n))
    return (q, k, v, i, f, *s), cot


def _assert_grads(got, want, gate, label):
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{label} d{name}: {a.shape} {a.dtype}"
        assert np.all(np.isfinite(np.asarray(a))), f"{label} d{name}: non-finite"
        if name == "m0" and gate != "exp":
            assert np.all(np.asarray(a) == 0), f"{label} dm0 must be 0 for the sigmoid gate"
            continue
        err = rel_err(a, b)
        assert err <= TOL, f"{label} d{name}: relative RMS error {err:.2e} > {TOL:.0e}"


SMALL_TILES = dict(block_q=16, block_kv=32, block_k=16, block_v=16, block_k_out=16,
                   block_v_out=16, block_q_dv=32, block_kv_dv=16, block_k_state=16,
                   block_v_state=16, block_t_state=16)

# (gate, normalize, chunk, T, B, H, K, V, keep_states, tiles); T >= 4 chunks after padding.
CASES = [
    ("exp", True, 16, 64, 1, 2, 16, 32, False, {}),
    ("exp", True, 32, 100, 2, 1, 32, 16, True, SMALL_TILES),
    ("exp", True, 128, 520, 1, 1, 16, 32, False, dict(block_q=32, block_kv=64)),
    ("exp", True, 256, 1024, 1, 1, 16, 32, False, {}),
    ("sigmoid", True, 64, 256, 1, 2, 16, 32, False, SMALL_TILES),
    ("sigmoid", True, 256, 1100, 1, 1, 32, 16, True, dict(block_q=128, block_kv=32)),
    ("sigmoid", False, 16, 70, 1, 2, 24, 40, False, {}),
    ("sigmoid", False, 128, 512, 1, 1, 32, 16, True, {}),
]


def _case_id(c):
    gate = {"exp": "exp", "sigmoid": "sig"}[c[0]] + ("" if c[1] else "-nonorm")
    return (f"{gate}-L{c[2]}-T{c[3]}-B{c[4]}H{c[5]}-K{c[6]}V{c[7]}"
            + ("-kept" if c[8] else "") + ("-tiles" if c[9] else ""))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_gradients_match_scan(case):
    gate, normalize, chunk, T, B, H, K, V, keep_states, tiles = case
    args, cot = _inputs(T + K + V, B, T, H, K, V)
    config = dataclasses.replace(BwdTilingConfig.get_default(chunk), **tiles)
    op = make_op(gate, normalize, config, keep_states=keep_states)
    got = _grads(functools.partial(pallas_mlstm, op, chunk), args, cot)
    want = _grads(functools.partial(reference_mlstm, gate, normalize), args, cot)
    _assert_grads(got, want, gate, _case_id(case))


@pytest.mark.parametrize("gate,normalize", [("exp", True), ("sigmoid", True)], ids=["exp", "sig"])
def test_extreme_gates(gate, normalize):
    # f~, i~ in [-30, 30], some i~ = -1e4, an i~ = +80 and an f~ = -1e4 (design §7).
    B, T, H, K, V, chunk = 1, 128, 2, 16, 16, 32
    args, cot = _inputs(21, B, T, H, K, V, i_range=(-30, 30), f_range=(-30, 30))
    q, k, v, i, f = args[:5]
    i = jnp.where(np.random.default_rng(0).random(i.shape) < 0.2, -1e4, i)
    i, f = i.at[:, 5].set(80.0), f.at[:, 40].set(-1e4)
    args = (q, k, v, i, f, *args[5:])
    op = make_op(gate, normalize, BwdTilingConfig.get_default(chunk))
    got = _grads(functools.partial(pallas_mlstm, op, chunk), args, cot)
    want = _grads(functools.partial(reference_mlstm, gate, normalize), args, cot)
    _assert_grads(got, want, gate, f"extreme-{gate}")


def test_chained_segments_equal_one_call():
    # State passed between calls, loss over every segment's h and the last state.
    gate, normalize, chunk = "exp", True, 16
    B, T, H, K, V = 1, 112, 2, 16, 16
    args, cot = _inputs(31, B, T, H, K, V)
    op = make_op(gate, normalize, BwdTilingConfig.get_default(chunk))
    cuts = [0, 35, 70, T]  # every segment pads to 48: one compiled segment shape

    def chained(q, k, v, i, f, c0, n0, m0):
        st, hs = MLSTMState(c0, n0, m0), []
        for a, b in zip(cuts[:-1], cuts[1:]):
            h, st = pallas_mlstm(op, chunk, *(x[:, a:b] for x in (q, k, v, i, f)), *st)
            hs.append(h)
        return jnp.concatenate(hs, axis=1), st

    whole = functools.partial(pallas_mlstm, op, chunk)
    (h0, s0), (h1, s1) = whole(*args), chained(*args)
    assert_close((h1, s1.c, s1.n, s1.m), (h0, s0.c, s0.n, s0.m), 1e-5, "chained values")
    got = _grads(chained, args, cot)
    want = _grads(functools.partial(reference_mlstm, gate, normalize), args, cot)
    _assert_grads(got, want, gate, "chained")


@pytest.mark.parametrize("gate,normalize,keep_states",
                         [("exp", True, False), ("sigmoid", False, True)],
                         ids=["exp-recompute", "sig-nonorm-kept"])
def test_with_pallas_forward(gate, normalize, keep_states):
    # The residuals and states of the Pallas forward (tfla_jax.pallas.fwd) feed the backward.
    pytest.importorskip("tfla_jax.pallas.fwd")
    B, T, H, K, V, chunk = 1, 128, 2, 32, 16, 32
    args, cot = _inputs(41, B, T, H, K, V)
    op = make_op(gate, normalize, BwdTilingConfig.get_default(chunk), keep_states=keep_states,
                 forward=_forward_pallas)
    got = _grads(functools.partial(pallas_mlstm, op, chunk), args, cot)
    want = _grads(functools.partial(reference_mlstm, gate, normalize), args, cot)
    _assert_grads(got, want, gate, "pallas-forward")


# ----------------------------------------------------------------------------------------------
# CUDA cross-lowering of every backward kernel configuration (no GPU needed)
# ----------------------------------------------------------------------------------------------

def _bwd_arg_structs(B, T, H, K, V, dtype, keep_states, chunk):
    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    NC = T // chunk
    args = (S((B, T, H, K), dtype), S((B, T, H, K), dtype), S((B, T, H, V), dtype),
            S((B, T, H), f32), S((B, T, H), f32),
            S((B, H, K, V), f32), S((B, H, K), f32), S((B, H), f32),
            S((B, T, H, V), dtype), S((B, H, T), f32), S((B, H, T), f32),
            S((B, T, H, V), dtype), S((B, H, K, V), f32), S((B, H, K), f32))
    states = ((S((B, H, NC + 1, K, V), f32), S((B, H, NC + 1, K), f32), S((B, H, NC + 1), f32))
              if keep_states else None)
    return args, states


# Shipped defaults for every chunk size and the head shapes in use (xLSTM-7B: K=256, V=512),
# plus non-power-of-two heads, float32 / float16, both gates, states kept and recomputed.
LOWER_CASES = (
    [("exp", True, L, 256, 512, "bfloat16", False) for L in (64, 128, 256, 512, 1024)]
    + [("sigmoid", True, L, 256, 512, "bfloat16", True) for L in (64, 128, 256)]
    + [("sigmoid", False, 128, 256, 512, "bfloat16", False),
       ("exp", True, 128, 64, 64, "bfloat16", False),
       ("exp", True, 256, 128, 128, "bfloat16", True),
       ("exp", True, 256, 96, 192, "bfloat16", False),
       ("exp", True, 64, 256, 512, "float16", False),
       ("exp", True, 128, 256, 512, "float32", False),
       ("sigmoid", True, 32, 16, 32, "float32", True)]
)


@pytest.mark.parametrize("case", LOWER_CASES,
                         ids=[f"{c[0]}{'' if c[1] else '-nonorm'}-L{c[2]}-K{c[3]}V{c[4]}-{c[5]}"
                              + ("-kept" if c[6] else "") for c in LOWER_CASES])
def test_lowers_for_cuda(case):
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    gate, normalize, chunk, K, V, dtype, keep_states = case
    dtype = jnp.dtype(dtype)
    B, H, T = 2, 4, 4 * chunk
    config = BwdTilingConfig.get_default(chunk, K, V, dtype)
    args, states = _bwd_arg_structs(B, T, H, K, V, dtype, keep_states, chunk)

    def fn(*a, states=None):
        return mlstm_bwd(*a, input_gate=gate, normalize=normalize, config=config,
                         interpret=False, states=states)

    mesh = AbstractMesh((), (), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu"))
    with use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*args, states=states).lower(
            lowering_platforms=("cuda",)).as_text()
    n_kernels = text.count("xla.gpu.triton")
    assert n_kernels == (4 if keep_states else 5), n_kernels
