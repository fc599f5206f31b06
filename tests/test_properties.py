"""Property-based: random shapes, chunk sizes and gates over the whole finite range (plus -inf),
every implementation (float32) against the recurrence in float64: finite, and as close as float32
arithmetic allows: within 1e-4, or within 10x of the float32 recurrence's own error where the
problem is ill-conditioned (e.g. a gradient that is all eps term). Outputs, final states (in a
common stabiliser) and every gradient. Shapes come from a small set so that compiled kernels are
reused across examples; the gate values are free."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import tfla_jax
from tfla_jax import MLSTMState
from tests import utils
from tests.utils import common_stabiliser, rel_err, run

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

SHAPES = [(1, 1, 1, 16, 16), (2, 7, 1, 16, 32), (1, 45, 2, 32, 16)]
# Float32 problems: the backends that take float32 (on the GPU the Mosaic one declines it; its
# 16-bit suite is tests/test_gpu.py).
IMPLS = ["chunkwise", *utils.float32_backends()]
F32_MAX = float(np.finfo(np.float32).max)


def gate_values(allow_inf):
    """Any float32: ordinary values, huge finite ones, and -inf where allowed."""
    finite = st.floats(-F32_MAX, F32_MAX, width=32)
    ordinary = st.floats(-20, 20, width=32)
    huge = st.sampled_from([-3e38, -1e30, -1e4, -4096.0, -4095.0, -100.0, 80.0, 1e4])
    parts = [ordinary, ordinary, huge, finite] + ([st.just(-np.inf)] if allow_inf else [])
    return st.one_of(*parts)


@st.composite
def problems(draw):
    B, T, H, K, V = draw(st.sampled_from(SHAPES))
    gate, normalize = draw(st.sampled_from([("exp", True), ("sigmoid", True),
                                            ("sigmoid", False)]))
    L = draw(st.sampled_from([16, 32]))
    i = draw(hnp.arrays(np.float32, (B, T, H), elements=gate_values(allow_inf=True)))
    f = draw(hnp.arrays(np.float32, (B, T, H), elements=gate_values(allow_inf=True)))
    if gate == "exp":  # the exp gate's stabiliser is exact for |i~| below ~1e29 (docs/numerics.md)
        i = np.where(np.abs(i) > 1e29, np.sign(i) * 1e29, i).astype(np.float32)
    seed = draw(st.integers(0, 2 ** 16))
    return B, T, H, K, V, gate, normalize, L, i, f, seed


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=problems(), impl=st.sampled_from(IMPLS))
def test_any_gates_match_recurrent(problem, impl):
    B, T, H, K, V, gate, normalize, L, i, f, seed = problem
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    s = MLSTMState(jnp.asarray(rng.normal(size=(B, H, K, V)) / 4, jnp.float32),
                   jnp.asarray(rng.normal(size=(B, H, K)) / 4, jnp.float32),
                   jnp.asarray(rng.normal(size=(B, H)), jnp.float32))
    cot = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    args = (q, k, v, jnp.asarray(i), jnp.asarray(f))
    kw = dict(input_gate=gate, normalize=normalize, initial_state=s, return_state=True)

    def loss(fn):
        return lambda a: jnp.sum(fn(*a)[0] * cot)

    def outputs(fn, args):
        (h, state), g = fn(*args), jax.grad(loss(fn))(args)
        return h, MLSTMState(*(np.asarray(x, np.float64) for x in state)), g

    def ref(*a):
        return tfla_jax.mlstm(*a, implementation="recurrent", **kw)

    mine = outputs(lambda *a: run(impl, *a, chunk_size=L, **kw), args)
    ref32 = outputs(ref, args)
    with jax.enable_x64(True):
        up = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        kw["initial_state"] = MLSTMState(*(up(x) for x in s))
        cot = up(cot)
        ref64 = outputs(ref, [up(x) for x in args])
    m = np.maximum(np.maximum(mine[1].m, ref32[1].m), ref64[1].m)   # one common stabiliser

    def flat(out):  # h, the final state in the stabiliser m, gradients
        h, state, g = out
        return [h, *common_stabiliser(state, state._replace(m=m))[0], *g]

    names = ["h", "final c", "final n", *(f"d{x}" for x in "qkvif")]
    for name, a, a32, a64 in zip(names, flat(mine), flat(ref32), flat(ref64)):
        assert np.all(np.isfinite(np.asarray(a))), f"{impl} {name} not finite"
        err, err32 = rel_err(a, a64), rel_err(a32, a64)
        assert err <= max(1e-4, 10 * err32), f"{impl} {name}: {err:.2e}, float32 scan {err32:.2e}"
