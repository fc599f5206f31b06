"""The one random-input factory and the one tolerance helper shared by all tests."""

import jax
import jax.numpy as jnp
import numpy as np

from tfla_jax import MLSTMState


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


def random_like(seed, tree):
    """Random normal arrays shaped like the leaves of tree (cotangents)."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves])


def rel_err(a, b) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return float(num / denom) if denom > 0 else float(num)


def assert_close(actual, expected, tol, name=""):
    """Asserts finiteness and relative RMS error <= tol, leaf by leaf for pytrees."""
    leaves_a, leaves_b = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(leaves_a) == len(leaves_b), name
    for idx, (a, b) in enumerate(zip(leaves_a, leaves_b)):
        assert a.shape == b.shape, f"{name}[{idx}]: shape {a.shape} != {b.shape}"
        assert np.all(np.isfinite(np.asarray(a, np.float64))), f"{name}[{idx}]: non-finite values"
        err = rel_err(a, b)
        assert err <= tol, f"{name}[{idx}]: relative RMS error {err:.3e} > {tol:.1e}"
