"""Compiled kernels on the GPU in bf16 and fp16 against the float64 recurrence (`pytest --gpu`;
collected only then, tests/conftest.py). Every kernel backend runs the same 16-bit grid at the
shapes the Mosaic GPU backend takes (chunks 128 / 256, head dims padded to 64): odd lengths,
T >= 4 chunks, d_qk != d_v, both gates, no normaliser, initial states, packed sequences with
starts inside chunks and at chunk edges, the extreme-gate table and chained calls.

Bound: h, the final state and every gradient within 5e-3 relative RMS of the float64 scan on
the same (16-bit valued) inputs. dm0 = <dc0, c0> + <dn0, n0> per (b, h) is a dot product whose
terms cancel (c0 and its cotangent are independent): its error is measured against the size of
its terms, |dc0| |c0| + |dn0| |n0|, i.e. in the norm in which dc0 and dn0 are held to 5e-3.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfla_jax
from tfla_jax import MLSTMState
from tests import utils
from tests.utils import (EXTREME, NAMES, assert_close, common_stabiliser, extreme_gates,
                         loss_and_grads, per_sequence, suite_inputs)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

KERNELS = utils.kernel_backends()
DTYPES = [jnp.bfloat16, jnp.float16]
TOL = 5e-3

# name, B, T, H, K, V, input gate, normalize, chunk size, initial state
CASES = [
    ("T1", 1, 1, 1, 64, 64, "exp", True, 128, True),
    ("T7-K96V192", 2, 7, 2, 96, 192, "sigmoid", True, 128, True),
    ("T1001-L256", 1, 1001, 2, 64, 128, "exp", True, 256, True),
    ("4L+3-L128-K256V512", 1, 515, 2, 256, 512, "exp", True, 128, True),
    ("4L+3-L256", 1, 1027, 1, 128, 256, "sigmoid", True, 256, False),
    ("unnormalized", 2, 300, 2, 64, 64, "sigmoid", False, 128, True),
    ("K256V256-zero-state", 2, 600, 2, 256, 256, "exp", True, 256, False),
    ("NC258-L128", 1, 33000, 1, 64, 64, "exp", True, 128, True),   # > 256 chunks: long T
]


def kernel(impl, args, cot, **kw):
    if impl == "pallas_mosaic_gpu" and utils.MOSAIC_CONFIG:
        q, v = args[0], args[2]
        cfg = tfla_jax.MosaicConfig.default(q.shape[-1], v.shape[-1], q.shape[1], q.dtype,
                                            chunk_size=kw.get("chunk_size"))
        kw["config"] = dataclasses.replace(cfg, **utils.MOSAIC_CONFIG)
    fn = functools.partial(tfla_jax.mlstm, implementation=impl, **kw)
    return jax.jit(lambda a, c: loss_and_grads(fn, a, c))(args, cot)


def reference(args, cot, per_sequence=None, **kw):
    """The float64 lax.scan recurrence (or `per_sequence`) on the inputs upcast: (h, state,
    grads)."""
    kw.pop("chunk_size", None)
    fn = per_sequence or functools.partial(tfla_jax.mlstm, implementation="recurrent", **kw)
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in args]
        cot64 = [jnp.asarray(np.asarray(x, np.float64)) for x in cot]
        run = jax.jit(lambda a, c: loss_and_grads(fn, a, c))
        h, s, g = run(up, cot64)
        return (np.asarray(h), MLSTMState(*(np.asarray(x) for x in s)),
                [np.asarray(x) for x in g])


def compare(got, want, what, s_in, gate="exp"):
    """got vs want: (h, final state, gradients); s_in: the initial (c0, n0)."""
    (h, s, g), (h_ref, s_ref, g_ref) = got, want
    assert_close(h, h_ref, TOL, f"{what} h")
    (c, n), (c_ref, n_ref) = common_stabiliser(s, s_ref)
    assert_close(c, c_ref, TOL, f"{what} final c")
    assert_close(n, n_ref, TOL, f"{what} final n")
    for name, a, b in zip(NAMES[:-1], g, g_ref):
        assert_close(a, b, TOL, f"{what} d{name}")
    if gate == "exp":                                   # sigmoid ignores m0
        norm = lambda x, axes: np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axes))  # noqa: E731
        terms = (norm(g_ref[5], (-2, -1)) * norm(s_in[0], (-2, -1))
                 + norm(g_ref[6], -1) * norm(s_in[1], -1))
        err = np.abs(np.asarray(g[7], np.float64) - g_ref[7]) / np.maximum(terms, 1e-30)
        utils.REPORT.append((utils.CURRENT_TEST, f"{what} dm0 / terms", float(err.max()), TOL))
        assert np.all(np.isfinite(np.asarray(g[7]))), f"{what} dm0: non-finite values"
        assert err.max() <= TOL, f"{what} dm0: error {err.max():.3e} of |dc0||c0| + |dn0||n0|"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", KERNELS)
def test_matches_float64(impl, case, dtype):
    name, B, T, H, K, V, gate, normalize, L, with_state = case
    args, cot = suite_inputs(T + K, B, T, H, K, V, dtype, with_state=with_state)
    kw = dict(input_gate=gate, normalize=normalize, chunk_size=L)
    compare(kernel(impl, args, cot, **kw), reference(args, cot, **kw), f"{impl} {name}",
            args[5:7], gate)


# Starts inside chunks, exactly at the chunk edges 128 and 256, length-1 sequences, ids reused.
_IDS = np.stack([
    np.repeat([0, 1, 2, 3], [5, 123, 200, 187]),
    np.repeat([4, 5, 6, 7, 8, 9, 4], [128, 128, 1, 1, 1, 3, 253]),
])


def _per_sequence(ids, **kw):
    def fn(q, k, v, i, f, *, initial_state, return_state):
        return per_sequence(q, k, v, i, f, initial_state, ids, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("impl", KERNELS)
def test_packed_sequences(impl, gate, dtype):
    B, T, H, K, V = 2, _IDS.shape[1], 2, 64, 128
    args, cot = suite_inputs(5, B, T, H, K, V, dtype)
    got = kernel(impl, args, cot, input_gate=gate, chunk_size=128,
                 segment_ids=jnp.asarray(_IDS, jnp.int32))
    want = reference(args, cot, per_sequence=_per_sequence(_IDS, input_gate=gate))
    compare(got, want, f"{impl} packed", args[5:7], gate)


@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("case", EXTREME)
@pytest.mark.parametrize("impl", KERNELS)
def test_extreme_gates(impl, case, gate):
    B, T, H, K, V = 1, 300, 2, 64, 64
    args, cot = suite_inputs(5, B, T, H, K, V, jnp.bfloat16,
                             gates=extreme_gates(case, (B, T, H)))
    kw = dict(input_gate=gate, chunk_size=128)
    compare(kernel(impl, args, cot, **kw), reference(args, cot, **kw), f"{impl} {case}",
            args[5:7], gate)


@pytest.mark.parametrize("impl", KERNELS)
def test_chained_calls(impl):
    """Cut at 100 and 256 (inside a chunk and at a chunk edge), the state passed on."""
    args, cot = suite_inputs(9, 2, 400, 2, 64, 128, jnp.bfloat16)
    cuts = [0, 100, 256, 400]

    def chained(q, k, v, i, f, *, initial_state, return_state):
        st, hs = initial_state, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            h, st = tfla_jax.mlstm(q[:, a:b], k[:, a:b], v[:, a:b], i[:, a:b], f[:, a:b],
                                   initial_state=st, return_state=True, implementation=impl,
                                   chunk_size=128)
            hs.append(h)
        return jnp.concatenate(hs, axis=1), st

    got = jax.jit(lambda a, c: loss_and_grads(chained, a, c))(args, cot)
    compare(got, reference(args, cot), f"{impl} chained", args[5:7])
