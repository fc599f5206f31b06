"""What every test shares: the input factory, the extreme-gate cases, the references and the
tolerance helpers, and the switch between interpreted (CPU) and compiled (GPU) kernels."""

import jax
import jax.numpy as jnp
import numpy as np

import tfla_jax
from tfla_jax import MLSTMState

ON_GPU = False          # set by `pytest --gpu` (tests/conftest.py)
MOSAIC_CONFIG = {}      # MosaicConfig overrides for tests/test_gpu.py (`--mosaic-config`)
REPORT = []             # (test, quantity, error, bound) of every assert_close, for --error-report
CURRENT_TEST = ""
NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")


def kernel_backends():
    return tfla_jax.available_backends()


def suite_backends():
    """The kernel backends the shared suite runs: all on the GPU; on the CPU those whose kernels
    interpret in float32 (the others are cross-lowered there, tests/test_lowering.py)."""
    return [n for n in kernel_backends()
            if ON_GPU or tfla_jax.get_backend(n).interpretable]


def declines(impl, q, v, *, chunk_size=None, input_gate="exp", normalize=True, **_):
    """True if kernel backend `impl` declines this call, after checking that `tfla_jax.mlstm`
    raises the ValueError naming its reason (e.g. the Mosaic GPU backend and float32 or chunk
    sizes below 128, on the GPU; tests/test_gpu.py runs it on the 16-bit cases it takes)."""
    if impl not in kernel_backends():
        return False
    import re

    import pytest

    from tfla_jax import backends
    B, T, H, K = q.shape
    call = backends.Call(B=B, T=T, H=H, K=K, V=v.shape[-1], dtype=jnp.dtype(q.dtype),
                         input_gate=input_gate, normalize=normalize,
                         platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                         interpret=not ON_GPU)
    backend = tfla_jax.get_backend(impl)
    reason = backend.supported(call, backend.default_config(call, chunk_size=chunk_size))
    if reason is None:
        return False
    f = jnp.zeros(q.shape[:3], jnp.float32)
    with pytest.raises(ValueError, match=re.escape(reason)):
        run(impl, q, q, v, f, f, chunk_size=chunk_size, input_gate=input_gate,
            normalize=normalize)
    return True


def float32_backends():
    """suite_backends() that run float32 inputs (the others decline them with a reason)."""
    q, v = jnp.zeros((1, 16, 1, 16), jnp.float32), jnp.zeros((1, 16, 1, 16), jnp.float32)
    return [n for n in suite_backends() if not declines(n, q, v, chunk_size=16)]


def x64() -> bool:
    return bool(jax.config.jax_enable_x64)


def run(impl, *args, **kw):
    """tfla_jax.mlstm with implementation=impl, kernels interpreted unless running on the GPU."""
    if impl in kernel_backends() or impl == "pallas":
        kw.setdefault("interpret", not ON_GPU)
    return tfla_jax.mlstm(*args, implementation=impl, **kw)


def make_inputs(seed, B, T, H, K, V, dtype=jnp.float32, *, with_state=False, i_range=None,
                f_range=None):
    """Random (q, k, v, i, f, state-or-None) in layout (B, T, H, D).

    Gates are N(0,1) for i~ and N(0,1)+2 for f~ (a realistic forget gate) unless uniform ranges are
    given. The state, when asked for, has c, n ~ N(0, 1/K) and m ~ N(0, 1).
    """
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    i = rng.uniform(*i_range, size=(B, T, H)) if i_range else rng.normal(size=(B, T, H))
    f = rng.uniform(*f_range, size=(B, T, H)) if f_range else rng.normal(size=(B, T, H)) + 2.0
    gate_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x, gate_dtype) for x in (i, f)]
    state = None
    if with_state:
        sdt = gate_dtype
        state = MLSTMState(
            c=jnp.asarray(rng.normal(size=(B, H, K, V)) / np.sqrt(K), sdt),
            n=jnp.asarray(rng.normal(size=(B, H, K)) / np.sqrt(K), sdt),
            m=jnp.asarray(rng.normal(size=(B, H)), sdt),
        )
    return (*arrays, state)


def extreme_gates(name, shape, seed=0):
    """(i~, f~) float32 numpy arrays of one named extreme-gate case (the numerics table)."""
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=shape)
    if name == "f=-1e4":
        return normal, np.full(shape, -1e4)
    if name == "f=-100":
        return normal, np.full(shape, -100.0)
    if name == "resets":                       # f~ = -1e4 every 37 steps, else +100
        f = np.full(shape, 100.0)
        f[:, ::37] = -1e4
        return normal, f
    if name == "mixture":
        f = rng.choice([-1e4, -100.0, 100.0, np.nan], size=shape)
        f = np.where(np.isnan(f), rng.normal(3.0, 1.0, size=shape), f)
        i = rng.choice([80.0, -1e4, np.nan], size=shape)
        return np.where(np.isnan(i), normal, i), f
    if name == "capped":                       # xLSTM 7B's soft-capped range, f~ = 15 tanh(3 z)
        return normal, 15.0 * np.tanh(3.0 * rng.normal(size=shape))
    if name == "f=-3e38":                      # finite, overflows any plain cumsum
        return normal, np.where(rng.random(shape) < 0.01, -3e38, 3.0)
    if name == "f=-1e30":
        f = np.full(shape, 3.0)
        f[:, shape[1] // 2] = -1e30
        return normal, f
    if name == "f=-inf":                       # hard resets
        return normal, np.where(rng.random(shape) < 0.05, -np.inf, 3.0)
    if name == "i=-inf":                       # no input at all
        return np.full(shape, -np.inf), rng.normal(3.0, 1.0, size=shape)
    if name == "i=-inf,f=-inf":
        return (np.where(rng.random(shape) < 0.5, -np.inf, normal),
                np.where(rng.random(shape) < 0.1, -np.inf, 3.0))
    raise KeyError(name)


EXTREME = ("f=-1e4", "f=-100", "resets", "mixture", "capped", "f=-3e38", "f=-1e30", "f=-inf",
           "i=-inf", "i=-inf,f=-inf")


def numpy_scan(q, k, v, i, f, *, input_gate="exp", normalize=True, scale=None, eps=1e-6):
    """The recurrence in numpy float64, independent of jax and of x64: h (B, T, H, V)."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
    B, T, H, K = q.shape
    q = q * (K ** -0.5 if scale is None else scale)
    c = np.zeros((B, H, K, v.shape[-1]))
    n = np.zeros((B, H, K))
    m = np.zeros((B, H))
    h = np.zeros(v.shape)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        F = np.maximum(-np.logaddexp(0.0, -f), -1e30)
        logi = i if input_gate == "exp" else -np.logaddexp(0.0, -i)
        for t in range(T):
            if input_gate == "exp":
                m_new = np.maximum(F[:, t] + m, logi[:, t])
            else:
                m_new = np.zeros_like(m)
            fa = np.where(F[:, t] <= -4096.0, 0.0, np.exp(F[:, t] + m - m_new))  # hard reset
            ia = np.exp(logi[:, t] - m_new)
            c = fa[..., None, None] * c + ia[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
            n = fa[..., None] * n + ia[..., None] * k[:, t]
            m = m_new
            num = np.einsum("bhk,bhkv->bhv", q[:, t], c)
            if normalize:
                floor = np.exp(-m) if input_gate == "exp" else 1.0
                num = num / (np.maximum(np.abs(np.einsum("bhk,bhk->bh", q[:, t], n)), floor)
                             + eps)[..., None]
            h[:, t] = num
    return h


def loss_and_grads(fn, args, cot):
    """(h, final state, gradients) of <h, cot_h> + <c_T, cot_c> + <n_T, cot_n>, where
    fn(q, k, v, i, f, initial_state=..., return_state=True) -> (h, state) and args = (q, k, v,
    i, f, c0, n0, m0); h is compared in cot_h's dtype."""
    def loss(args):
        h, s = fn(*args[:5], initial_state=MLSTMState(*args[5:]), return_state=True)
        return (jnp.sum(h.astype(cot[0].dtype) * cot[0]) + jnp.sum(s.c * cot[1])
                + jnp.sum(s.n * cot[2])), (h, s)

    (_, (h, s)), g = jax.value_and_grad(loss, has_aux=True)(args)
    return h, s, g


def suite_inputs(seed, B, T, H, K, V, dtype, *, with_state=True, gates=None):
    """((q, k, v, i, f, c0, n0, m0), (dh, dc, dn)) for `loss_and_grads`; gates: optional (i~, f~)
    arrays replacing the random ones. dh is rounded to dtype, as autodiff hands it to the
    kernels when h comes out in dtype (the reference then solves the same problem)."""
    q, k, v, i, f, s = make_inputs(seed, B, T, H, K, V, dtype, with_state=True)
    if gates is not None:
        i, f = (jnp.asarray(x, jnp.float32) for x in gates)
    if not with_state:
        s = MLSTMState(*(jnp.zeros_like(x) for x in s))
    cot = random_like(seed + 1, (jnp.zeros((B, T, H, V), jnp.float32), s.c, s.n))
    cot = (cot[0].astype(dtype).astype(jnp.float32), *cot[1:])
    return (q, k, v, i, f, *s), cot


def per_sequence(q, k, v, i, f, state, ids, **kw):
    """h and the final state of each row's sequences (segment ids `ids`, numpy (B, T)) run one
    by one with the lax.scan recurrence: the initial state for a row's first sequence, zeros
    after (the packed-sequence reference)."""
    from tfla_jax.ref import mlstm_recurrent
    hs, finals = [], []
    for b in range(ids.shape[0]):
        starts = [0, *np.flatnonzero(ids[b, 1:] != ids[b, :-1]) + 1, ids.shape[1]]
        row_state = None if state is None else MLSTMState(*(x[b:b + 1] for x in state))
        parts = []
        for lo, hi in zip(starts[:-1], starts[1:]):
            sl = lambda x: x[b:b + 1, lo:hi]  # noqa: E731
            h, row_state = mlstm_recurrent(sl(q), sl(k), sl(v), sl(i), sl(f),
                                           initial_state=row_state, **kw)
            parts.append(h)
            row_state = row_state if hi == ids.shape[1] else None   # the next one starts at 0
        hs.append(jnp.concatenate(parts, axis=1))
        finals.append(row_state)
    return jnp.concatenate(hs, 0), MLSTMState(*(jnp.concatenate(x, 0) for x in zip(*finals)))


def random_like(seed, tree):
    """Random normal arrays shaped like the leaves of tree (cotangents)."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves])


def rel_err(a, b) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64 (0 when both are 0).

    Values below float32's smallest normal number carry no relative precision in float32 (e.g.
    d f~ = dF sigmoid(-f~) at f~ = -100 is ~1e-44), so ||b|| counts as at least that per element.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = max(np.linalg.norm(b), np.finfo(np.float32).tiny * np.sqrt(b.size))
    return float(np.linalg.norm(a - b) / denom)


def assert_close(actual, expected, tol, name=""):
    """Asserts finiteness and relative RMS error <= tol, leaf by leaf for pytrees."""
    leaves_a, leaves_b = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(leaves_a) == len(leaves_b), name
    for idx, (a, b) in enumerate(zip(leaves_a, leaves_b)):
        assert a.shape == b.shape, f"{name}[{idx}]: shape {a.shape} != {b.shape}"
        assert np.all(np.isfinite(np.asarray(a, np.float64))), f"{name}[{idx}]: non-finite values"
        err = rel_err(a, b)
        REPORT.append((CURRENT_TEST, f"{name}[{idx}]", err, tol))
        assert err <= tol, f"{name}[{idx}]: relative RMS error {err:.3e} > {tol:.1e}"


def common_stabiliser(state, ref_state):
    """(c, n) of both states in the stabiliser max(m, m_ref), float64: a state is only defined up
    to its stabiliser ((C, n, m) ~ (e^d C, e^d n, m - d)), and two exact forms may pick different
    ones where the difference is invisible (a reset followed by no input)."""
    m = np.maximum(np.asarray(state.m, np.float64), np.asarray(ref_state.m, np.float64))

    def rescale(s):
        w = np.exp(np.asarray(s.m, np.float64) - m)
        return (np.asarray(s.c, np.float64) * w[..., None, None],
                np.asarray(s.n, np.float64) * w[..., None])

    return rescale(state), rescale(ref_state)
