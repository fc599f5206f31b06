"""The three references (recurrent scan, parallel, chunkwise) agree with each other: values,
final states and gradients, in float64; plus extreme gates, long sequences and chaining."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfla_jax import MLSTMState, mlstm, mlstm_step
from tfla_jax import ref
from tests.utils import assert_close, make_inputs, random_like, rel_err

GATES = [("exp", True), ("sigmoid", True), ("sigmoid", False)]
GATE_IDS = ["exp", "sig", "sig-nonorm"]
BH = [(1, 1), (2, 3)]
KV = [(16, 16), (32, 64), (64, 32)]
TS = [1, 7, 64, 100, 257]


def run(impl, q, k, v, i, f, state, gate, normalize, chunk_size=16):
    return mlstm(q, k, v, i, f, input_gate=gate, normalize=normalize, initial_state=state,
                 return_state=True, implementation=impl,
                 chunk_size=chunk_size if impl == "chunkwise" else None)


def state_leaves(state, gate):
    # The sigmoid variant has no stabiliser: m is zero by definition, compare c and n.
    return (state.c, state.n, state.m) if gate == "exp" else (state.c, state.n)


# Every value of the grid appears; (B, H) x (K, V) cycles with T so the run stays short.
GRID = [(T, *BH[n % 2], *KV[n % 3]) for n, T in enumerate(TS)]
GRID += [(T, *BH[(n + 1) % 2], *KV[(n + 1) % 3]) for n, T in enumerate(TS)]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("gate,normalize", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("T,B,H,K,V", GRID, ids=[f"T{g[0]}-B{g[1]}H{g[2]}-K{g[3]}V{g[4]}" for g in GRID])
def test_references_agree_float64(T, B, H, K, V, gate, normalize, with_state):
    with jax.enable_x64(True):
        q, k, v, i, f, s = make_inputs(T * 7 + K, B, T, H, K, V, jnp.float64, with_state=with_state)
        h0, s0 = run("recurrent", q, k, v, i, f, s, gate, normalize)
        assert h0.dtype == jnp.float64 and s0.c.dtype == jnp.float64
        for impl in ("parallel", "chunkwise"):
            h1, s1 = run(impl, q, k, v, i, f, s, gate, normalize)
            assert_close(h1, h0, 1e-10, f"{impl} h")
            assert_close(state_leaves(s1, gate), state_leaves(s0, gate), 1e-10, f"{impl} state")


@pytest.mark.parametrize("chunk_size", [1, 2, 16, 32, 128])
def test_chunkwise_any_chunk_size(chunk_size):
    with jax.enable_x64(True):
        q, k, v, i, f, s = make_inputs(3, 2, 300, 2, 16, 32, jnp.float64, with_state=True)
        h0, s0 = run("recurrent", q, k, v, i, f, s, "exp", True)
        h1, s1 = run("chunkwise", q, k, v, i, f, s, "exp", True, chunk_size=chunk_size)
        assert_close((h1, *s1), (h0, *s0), 1e-10, f"chunk {chunk_size}")


@pytest.mark.parametrize("gate,normalize", GATES, ids=GATE_IDS)
def test_extreme_gates_finite_and_agree(gate, normalize):
    # f~ in [-30, 30]; i~ from -1e4 up to +30, plus the f~ = -1e4 and i~ = +80.
    with jax.enable_x64(True):
        B, T, H, K, V = 2, 200, 2, 16, 16
        q, k, v, i, f, s = make_inputs(11, B, T, H, K, V, jnp.float64, with_state=True,
                                       i_range=(-30, 30), f_range=(-30, 30))
        rng = np.random.default_rng(0)
        i = jnp.where(rng.random(i.shape) < 0.2, -1e4, i)
        i = i.at[:, 5].set(80.0)
        f = f.at[:, 10].set(-1e4)
        for dtype in (jnp.float64, jnp.float32):
            args = [x.astype(dtype) for x in (q, k, v, i, f)]
            st = MLSTMState(*(x.astype(dtype) for x in s))
            h0, s0 = run("recurrent", *args, st, gate, normalize)
            for impl in ("parallel", "chunkwise"):
                h1, s1 = run(impl, *args, st, gate, normalize)
                tol = 1e-10 if dtype == jnp.float64 else 1e-4
                assert_close(h1, h0, tol, f"{impl} {dtype.__name__} h")
                assert_close(state_leaves(s1, gate), state_leaves(s0, gate), tol,
                             f"{impl} {dtype.__name__} state")


def test_long_sequence_finite():
    q, k, v, i, f, _ = make_inputs(5, 1, 16384, 1, 16, 16, jnp.float32)
    h0, s0 = run("recurrent", q, k, v, i, f, None, "exp", True)
    h1, s1 = run("chunkwise", q, k, v, i, f, None, "exp", True, chunk_size=64)
    assert np.all(np.isfinite(h0)) and np.all(np.isfinite(h1))
    assert_close(h1, h0, 1e-4, "h")
    assert_close(tuple(s1), tuple(s0), 1e-4, "state")


def _loss_fn(impl, gate, normalize, chunk_size=16):
    """Scalar loss <h, dh> + <c_T, dc> + <n_T, dn> with fixed random cotangents."""

    def loss(args, cot):
        q, k, v, i, f, c0, n0, m0 = args
        h, s = run(impl, q, k, v, i, f, MLSTMState(c0, n0, m0), gate, normalize, chunk_size)
        return jnp.sum(h * cot[0]) + jnp.sum(s.c * cot[1]) + jnp.sum(s.n * cot[2])

    return loss


@pytest.mark.parametrize("gate,normalize", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("T,K,V", [(7, 16, 32), (100, 32, 16)])
def test_gradients_match_scan_float64(T, K, V, gate, normalize):
    with jax.enable_x64(True):
        B, H = 2, 2
        q, k, v, i, f, s = make_inputs(T + K, B, T, H, K, V, jnp.float64, with_state=True)
        args = (q, k, v, i, f, *s)
        cot = random_like(1, (jnp.zeros((B, T, H, V)), s.c, s.n))
        cot = jax.tree.map(lambda x: x.astype(jnp.float64), cot)
        g0 = jax.jit(jax.grad(_loss_fn("recurrent", gate, normalize)))(args, cot)
        names = ["q", "k", "v", "i", "f", "c0", "n0", "m0"]
        for impl in ("parallel", "chunkwise"):
            g1 = jax.jit(jax.grad(_loss_fn(impl, gate, normalize)))(args, cot)
            for name, a, b in zip(names, g1, g0):
                if name == "m0" and gate != "exp":
                    assert np.all(a == 0) and np.all(b == 0)
                    continue
                assert rel_err(a, b) <= 1e-8, f"{impl} d{name}: {rel_err(a, b):.2e}"


def test_dm0_formula_exp():
    # design §4: dm_0 = <dC_0, C_0> + <dn_0, n_0> for the exponential gate.
    with jax.enable_x64(True):
        q, k, v, i, f, s = make_inputs(2, 1, 20, 2, 8, 8, jnp.float64, with_state=True)
        cot = random_like(3, (jnp.zeros((1, 20, 2, 8)), s.c, s.n))
        g = jax.grad(_loss_fn("recurrent", "exp", True))((q, k, v, i, f, *s), cot)
        dc0, dn0, dm0 = g[5], g[6], g[7]
        expect = jnp.sum(dc0 * s.c, axis=(-1, -2)) + jnp.sum(dn0 * s.n, axis=-1)
        assert_close(dm0, expect, 1e-10, "dm0")


@pytest.mark.parametrize("impl", ["recurrent", "parallel", "chunkwise"])
@pytest.mark.parametrize("gate,normalize", GATES, ids=GATE_IDS)
def test_chained_calls_equal_one_call(impl, gate, normalize):
    with jax.enable_x64(True):
        B, T, H, K, V = 2, 90, 2, 16, 16
        q, k, v, i, f, s = make_inputs(4, B, T, H, K, V, jnp.float64, with_state=True)
        cuts = [0, 13, 50, T]
        dh = random_like(5, jnp.zeros((B, T, H, V), jnp.float64))

        def whole(args):
            return run(impl, *args[:5], MLSTMState(*args[5:]), gate, normalize)

        def chained(args):
            st, hs = MLSTMState(*args[5:]), []
            for a, b in zip(cuts[:-1], cuts[1:]):
                h, st = run(impl, *(x[:, a:b] for x in args[:5]), st, gate, normalize)
                hs.append(h)
            return jnp.concatenate(hs, axis=1), st

        def loss(fn):
            def value(args):
                h, st = fn(args)
                return jnp.sum(h * dh) + jnp.sum(st.c) + jnp.sum(st.n)
            return jax.jit(jax.value_and_grad(value))

        args = (q, k, v, i, f, *s)
        (h0, s0), (h1, s1) = whole(args), chained(args)
        assert_close(h1, h0, 1e-10, "h")
        assert_close(state_leaves(s1, gate), state_leaves(s0, gate), 1e-10, "state")
        (l0, g0), (l1, g1) = loss(whole)(args), loss(chained)(args)
        assert abs(float(l1 - l0)) <= 1e-9 * abs(float(l0))
        for name, a, b in zip(["q", "k", "v", "i", "f", "c0", "n0", "m0"], g1, g0):
            assert rel_err(a, b) <= 1e-9, f"d{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("gate,normalize", GATES, ids=GATE_IDS)
def test_step_equals_scan(gate, normalize):
    with jax.enable_x64(True):
        B, T, H, K, V = 2, 12, 3, 16, 32
        q, k, v, i, f, s = make_inputs(6, B, T, H, K, V, jnp.float64, with_state=True)
        h0, s0 = run("recurrent", q, k, v, i, f, s, gate, normalize)
        st, hs = s, []
        for t in range(T):
            h, st = mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], st, input_gate=gate,
                               normalize=normalize)
            hs.append(h)
        assert_close(jnp.stack(hs, axis=1), h0, 1e-12, "h")
        assert_close(state_leaves(st, gate), state_leaves(s0, gate), 1e-12, "state")


@pytest.mark.parametrize("impl", ["recurrent", "parallel", "chunkwise"])
@pytest.mark.parametrize("gate,normalize", GATES, ids=GATE_IDS)
def test_bf16_inputs(impl, gate, normalize):
    q, k, v, i, f, s = make_inputs(7, 2, 100, 2, 32, 32, jnp.float32, with_state=True)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with jax.enable_x64(True):  # the float64 result for the same (bf16-valued) inputs
        hi = [jnp.asarray(x, jnp.float64) for x in (q, k, v, i, f)]
        h64, _ = run("recurrent", *hi, MLSTMState(*(x.astype(jnp.float64) for x in s)), gate,
                     normalize)
    h, st = run(impl, q, k, v, i, f, s, gate, normalize)
    assert h.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in st)
    assert rel_err(h, h64) <= 1e-2


def test_stabiliser_invariance():
    # Shifting m_0 by d while scaling c_0, n_0 by exp(-d) describes the same state.
    with jax.enable_x64(True):
        q, k, v, i, f, s = make_inputs(8, 2, 40, 2, 16, 16, jnp.float64, with_state=True)
        d = 3.7
        s2 = MLSTMState(s.c * np.exp(-d), s.n * np.exp(-d), s.m + d)
        for impl in ("recurrent", "parallel", "chunkwise"):
            # Exact with eps = 0; the eps term itself is not invariant (eps * e^m in true units).
            h0 = mlstm(q, k, v, i, f, initial_state=s, eps=0.0, implementation=impl)[0]
            h1 = mlstm(q, k, v, i, f, initial_state=s2, eps=0.0, implementation=impl)[0]
            assert_close(h1, h0, 1e-10, impl)


@pytest.mark.parametrize("state", ["none", "zeros-in-jit"])
def test_float32_larger_shape(state):
    # A shape where an XLA:CPU miscompile of `q @ zeros` once broke the parallel form.
    B, T, H, K, V = 2, 1024, 4, 64, 128
    q, k, v, i, f, _ = make_inputs(9, B, T, H, K, V, jnp.float32)
    h0, _ = run("recurrent", q, k, v, i, f, None, "exp", True)

    @jax.jit
    def both(q, k, v, i, f):
        s = None if state == "none" else ref.zero_state(B, H, K, V)
        return [run(impl, q, k, v, i, f, s, "exp", True)[0] for impl in ("parallel", "chunkwise")]

    for name, h in zip(("parallel", "chunkwise"), both(q, k, v, i, f)):
        assert_close(h, h0, 1e-5, name)
