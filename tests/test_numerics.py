"""The numerics bar (docs/numerics.md): for the extreme-gate table, every kernel backend's float32
error against a float64 scan stays within 10x of the chunkwise XLA form's, at every chunk size up
to 4096; gradients likewise at L = 256. `pytest -s` prints the measured table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfla_jax
from tests import utils
from tests.utils import extreme_gates, numpy_scan, random_like, rel_err, run

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

KERNELS = utils.suite_backends()
TABLE = ("f=-1e4", "f=-100", "resets", "mixture", "capped", "f=-3e38", "f=-1e30", "f=-inf",
         "i=-inf")
CHUNKS = (16, 64, 256, 1024, 4096)


def _inputs(case, T=512, B=1, H=2, K=32, V=32):
    rng = np.random.default_rng(7)
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    i, f = (jnp.asarray(x, jnp.float32) for x in extreme_gates(case, (B, T, H), seed=3))
    return q, k, v, i, f


@functools.partial(jax.jit, static_argnames=("impl", "L"))
def _grads(args, cot, *, impl, L):
    """Gradients of <h, cot> (compiled once per implementation: the cases differ in values)."""
    return jax.grad(lambda a: jnp.sum(run(impl, *a, chunk_size=L)[0] * cot))(args)


def _bound(err_xla):
    return 10 * err_xla + 1e-6


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", TABLE)
def test_forward_within_10x_of_chunkwise(impl, case):
    args = _inputs(case, T=2048 if case == "capped" else 512)
    if utils.declines(impl, args[0], args[2]):      # float32 (the Mosaic GPU backend: 16-bit)
        return
    h64 = numpy_scan(*args)
    err_xla = rel_err(tfla_jax.mlstm(*args, implementation="chunkwise")[0], h64)
    errs = {L: rel_err(run(impl, *args, chunk_size=L)[0], h64) for L in CHUNKS}
    print(f"\n{case:10s} chunkwise {err_xla:.1e} | {impl} "
          + " ".join(f"L{L} {e:.1e}" for L, e in errs.items()))
    for L, e in errs.items():
        assert e <= _bound(err_xla), f"{impl} {case} L={L}: {e:.2e} vs chunkwise {err_xla:.2e}"


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", TABLE)
def test_gradients_within_10x_of_chunkwise(impl, case):
    args = _inputs(case, T=256)
    if utils.declines(impl, args[0], args[2]):
        return
    cot = random_like(1, jnp.zeros(args[2].shape))
    dt = jnp.float64 if utils.x64() else jnp.float32

    g_ref = _grads([x.astype(dt) for x in args], cot.astype(dt), impl="recurrent", L=None)
    g_xla = _grads(args, cot, impl="chunkwise", L=64)
    g = _grads(args, cot, impl=impl, L=256)
    for name, a, b, r in zip(utils.NAMES, g, g_xla, g_ref):
        assert np.all(np.isfinite(np.asarray(a))), f"{impl} {case} d{name} not finite"
        err, err_xla = rel_err(a, r), rel_err(b, r)
        print(f"\n{case:10s} d{name} chunkwise {err_xla:.1e} {impl} {err:.1e}", end="")
        assert err <= _bound(err_xla) + 1e-5, f"{impl} {case} d{name}: {err:.2e} vs {err_xla:.2e}"
