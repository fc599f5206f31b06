"""The Mosaic GPU backend on the CPU: its chunk-state kernel interpreted against a float64
recurrence, both directions (the output kernel's warp-specialised pipeline is compiled on the
GPU only: `pytest --gpu tests/test_backends.py`; every kernel is cross-lowered for CUDA in
tests/test_lowering.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
# (K, V, block_v, warpgroups): one compute warpgroup, two along K (sharing b), two along V.
@pytest.mark.parametrize("K,V,block_v,warpgroups", [(64, 128, None, 2), (128, 64, None, 2),
                                                    (64, 128, 64, 2), (128, 64, None, 1)])
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
    rel = lambda got, want: float(np.sqrt(np.mean((np.asarray(got, np.float64) - want) ** 2)  # noqa: E731
                                          / np.mean(want ** 2)))
    # bf16 states and the bf16 / fp16 operand (w a) bound the error; y is float32 throughout.
    assert rel(xs, rxs) < 5e-3
    assert rel(last, rlast) < 5e-3
    assert rel(ys, rys) < 1e-5
