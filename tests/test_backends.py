"""The shared suite every implementation runs against the lax.scan recurrence (the ground truth).

Implementations: every registered kernel backend; the XLA forms "parallel" and "chunkwise" run
the extreme-gate, determinism and chaining tests here and their shape grid in float64 in
test_ref.py. On the CPU (CI) the
kernels run interpreted in float32 with tight tolerances; `pytest --gpu` runs the same tests
compiled on the GPU in bf16, fp16 and fp32. With JAX_ENABLE_X64=1 the reference is computed in
float64. Each test checks the output, the final state and every gradient (q, k, v, i~, f~ and the
initial state, with cotangents on h and on the final state).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfla_jax
from tests import utils
from tests.utils import (EXTREME, NAMES, assert_close, common_stabiliser, extreme_gates,
                         loss_and_grads, rel_err, run, suite_inputs)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

IMPLS = ["parallel", "chunkwise", *utils.suite_backends()]
KERNELS = utils.suite_backends()
# Relative RMS bounds per input dtype: float32 is exact arithmetic up to rounding (full-precision
# dots); bf16 / fp16 round the tensor-core operands (P, k e^a, dh, and for bf16 the states) to
# the input dtype, fp16's products with states are TF32; tiny cases (T=1: 16 numbers) are noisy.
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 1e-2}


def dtypes():
    return [jnp.bfloat16, jnp.float16, jnp.float32] if utils.ON_GPU else [jnp.float32]


def reference(*args, **kw):
    """jax.grad-able recurrent scan in float64 under x64, else float32, on the same inputs."""
    dt = jnp.float64 if utils.x64() else jnp.float32
    args = [None if a is None else jax.tree.map(lambda x: x.astype(dt), a) for a in args]
    return tfla_jax.mlstm(*args, implementation="recurrent", **kw)


def value_and_grads(fn, args, cot, **kw):
    """(h, final state) and the gradients of <h, cot_h> + <c_T, cot_c> + <n_T, cot_n>.

    fn: an implementation name or "reference" (compiled once per name, options and shapes, so
    that cases with other values reuse it), or a function.
    """
    if isinstance(fn, str):
        return _value_and_grads(args, cot, impl=fn, opts=tuple(sorted(kw.items())))
    return jax.jit(loss_and_grads, static_argnums=0)(functools.partial(fn, **kw), args, cot)


@functools.partial(jax.jit, static_argnames=("impl", "opts"))
def _value_and_grads(args, cot, *, impl, opts):
    fn = reference if impl == "reference" else functools.partial(run, impl)
    return loss_and_grads(functools.partial(fn, **dict(opts)), args, cot)


def check(impl, args, cot, *, tol, chunk_size=None, what="", **kw):
    """impl vs the reference: h, the final state (in a common stabiliser) and every gradient.
    Returns False (after checking the ValueError) where a kernel backend declines the call."""
    if utils.declines(impl, args[0], args[2], chunk_size=chunk_size, **kw):
        return False
    if impl != "parallel":
        kw["chunk_size"] = chunk_size
    h, s, g = value_and_grads(impl, args, cot, **kw)
    kw.pop("chunk_size", None)
    h_ref, s_ref, g_ref = value_and_grads("reference", args, cot, **kw)
    dtype = args[2].dtype
    sens = [0.0] * 11          # h, c, n, then the 8 gradients
    if dtype != jnp.float32:
        # The kernels round operands (P, states, h in the normaliser's gradient) to the input
        # dtype: add the reference's own sensitivity to relative perturbations of one unit
        # roundoff of its inputs (its condition number times u; large only where the result is
        # ill-conditioned, e.g. dq of the scale-invariant h = num / |den| at T = 1).
        u = float(jnp.finfo(dtype).eps) / 2
        rng = np.random.default_rng(0)

        def perturb(j, x):
            if j not in (0, 1, 2, 5, 6):       # q, k, v, c0, n0
                return x
            x = x.astype(jnp.float32)
            return x * (1 + u * jnp.asarray(rng.normal(size=x.shape), jnp.float32))

        perturbed = [perturb(j, x) for j, x in enumerate(args)]
        h_r, s_r, g_r = value_and_grads("reference", perturbed, cot, **kw)
        sens = [rel_err(h_r, h_ref), 0.0, 0.0, *(rel_err(a, b) for a, b in zip(g_r, g_ref))]
    elif utils.x64():
        # A float64 reference: float32 arithmetic cannot beat what the float32 recurrence gets
        # where the case is ill-conditioned (the extreme-gate mixture); allow 10x of that.
        h_32, s_32, g_32 = value_and_grads("recurrent", args, cot, **kw)
        sens = [rel_err(h_32, h_ref), 0.0, 0.0, *(rel_err(a, b) for a, b in zip(g_32, g_ref))]
        sens = [10 * x / 3 for x in sens]
    assert h.dtype == dtype
    assert_close(h, h_ref, max(tol, 3 * sens[0]), f"{what} h")
    (c, n), (c_ref, n_ref) = common_stabiliser(s, s_ref)
    assert_close(c, c_ref, tol, f"{what} final c")
    assert_close(n, n_ref, tol, f"{what} final n")
    names = NAMES if kw.get("input_gate", "exp") == "exp" else NAMES[:-1]  # sigmoid ignores m0
    for j, (name, a, b) in enumerate(zip(names, g, g_ref)):
        assert a.dtype == b.dtype or a.dtype == args[NAMES.index(name)].dtype
        assert_close(a, b, max(tol, 3 * sens[3 + j]), f"{what} d{name}")
    return True


# name, B, T, H, K, V, input gate, normalize, chunk size, initial state
CASES = [
    ("T1", 1, 1, 1, 16, 16, "exp", True, 16, True),
    ("T1-zero-state", 2, 1, 3, 16, 16, "sigmoid", True, 16, False),
    ("T7-K32V64", 2, 7, 3, 32, 64, "sigmoid", True, 16, True),
    ("T100", 1, 100, 2, 16, 32, "exp", True, 16, True),
    ("T70-unnormalized", 2, 70, 1, 32, 16, "sigmoid", False, 16, True),
    ("K256-V512", 1, 70, 1, 256, 512, "exp", True, 16, True),
    ("K20-V24", 1, 50, 1, 20, 24, "sigmoid", True, 16, False),
    ("T1001-L64", 1, 1001, 1, 16, 16, "exp", True, 64, True),
]


@pytest.mark.parametrize("dtype", dtypes(), ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", KERNELS)
def test_matches_recurrent(impl, case, dtype):
    # (The XLA forms run this grid in float64 in test_ref.py.)
    name, B, T, H, K, V, gate, normalize, L, with_state = case
    args, cot = suite_inputs(T + K, B, T, H, K, V, dtype, with_state=with_state)
    check(impl, args, cot, tol=TOL[dtype], chunk_size=L, input_gate=gate, normalize=normalize,
          what=f"{impl} {name}")


@pytest.mark.parametrize("L", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("impl", KERNELS)
def test_every_chunk_size(impl, L):
    """T = 4 L + 3: four whole chunks and a padded fifth."""
    args, cot = suite_inputs(L, 1, 4 * L + 3, 1, 16, 32, jnp.float32)
    check(impl, args, cot, tol=TOL[jnp.float32], chunk_size=L, input_gate="exp", what=f"L{L}")


@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("case", EXTREME)
@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_gates(impl, case, gate):
    """Every finite gate, f~ = -inf (hard reset) and i~ = -inf (no input): finite, and equal to
    the recurrence (h also against a float64 numpy scan); docs/numerics.md."""
    B, T, H, K, V = 1, 96, 2, 16, 16
    (q, k, v, _, _, *s), cot = suite_inputs(5, B, T, H, K, V, jnp.float32)
    i, f = (jnp.asarray(x, jnp.float32) for x in extreme_gates(case, (B, T, H)))
    args = (q, k, v, i, f, *s)
    if not check(impl, args, cot, tol=1e-4, chunk_size=32, input_gate=gate,
                 what=f"{impl} {case}"):
        return
    h, _ = run(impl, q, k, v, i, f, input_gate=gate, **({} if impl == "parallel" else
                                                        dict(chunk_size=32)))
    # Against float64: within 10x of what the float32 recurrence itself gets (some of these
    # cases are ill-conditioned: e^80 input weights next to e^-1e4 decays).
    h64 = utils.numpy_scan(q, k, v, i, f, input_gate=gate)
    floor = rel_err(tfla_jax.mlstm(q, k, v, i, f, input_gate=gate, implementation="recurrent")[0],
                    h64)
    err = rel_err(h, h64)
    assert err <= 10 * floor + 1e-6, f"{impl} {case}: {err:.2e} vs float64, recurrent {floor:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    args, cot = suite_inputs(3, 2, 50, 2, 16, 32, jnp.float32)
    kw = {} if impl == "parallel" else dict(chunk_size=16)
    if utils.declines(impl, args[0], args[2], **kw):
        return
    first, second = (value_and_grads(impl, args, cot, **kw) for _ in range(2))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("impl", IMPLS)
def test_chained_calls_equal_one_call(impl, gate):
    """Cutting the sequence at 7 and 23 (inside and at chunk edges) and passing the state on."""
    args, cot = suite_inputs(9, 2, 40, 2, 16, 32, jnp.float32)
    kw = {} if impl == "parallel" else dict(chunk_size=16)
    if utils.declines(impl, args[0], args[2], input_gate=gate, **kw):
        return
    cuts = [0, 7, 23, 32, 40]

    def chained(q, k, v, i, f, *, initial_state, return_state, input_gate):
        st, hs = initial_state, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            h, st = run(impl, q[:, a:b], k[:, a:b], v[:, a:b], i[:, a:b], f[:, a:b],
                        initial_state=st, return_state=True, input_gate=input_gate, **kw)
            hs.append(h)
        return jnp.concatenate(hs, axis=1), st

    h1, s1, g1 = value_and_grads(chained, args, cot, input_gate=gate)
    h0, s0, g0 = value_and_grads("reference", args, cot, input_gate=gate)
    assert_close((h1, s1.c, s1.n), (h0, s0.c, s0.n), 1e-4, f"chained {impl}")
    names = NAMES if gate == "exp" else NAMES[:-1]
    for name, a, b in zip(names, g1, g0):
        assert_close(a, b, 1e-4, f"chained {impl} d{name}")
