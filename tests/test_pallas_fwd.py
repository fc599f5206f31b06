"""TFLA forward Pallas kernels in interpret mode vs the recurrent (lax.scan) reference.

fp32 inputs: the kernels use full-precision float32 dots (lax.Precision.HIGHEST), so the bound is
tight (1e-4 relative RMS). bf16/fp16: compared with the reference on the same (rounded) inputs in
float32; the kernels round P, k*exp(a - m) and (bf16) C_{k-1} to the input dtype before the tensor
core dots, hence an honest 2e-2 bound. Interpret mode returns NaN for elements a kernel never
writes, so every comparison below also catches unwritten outputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfla_jax
from tfla_jax import ref
from tfla_jax.pallas import TilingConfig, mlstm_fwd, mlstm_pallas
from tests.utils import assert_close, make_inputs

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 1e-2}


def check_against_recurrent(args, state, *, input_gate, normalize=True, dtype=jnp.float32,
                            chunk_size=16, config=None, tol=None):
    tol = TOL[dtype] if tol is None else tol
    h, final = mlstm_pallas(*args, input_gate=input_gate, normalize=normalize,
                            initial_state=state, chunk_size=None if config else chunk_size,
                            config=config, interpret=True)
    up = [x.astype(jnp.float32) for x in args]
    h_ref, final_ref = ref.mlstm_recurrent(*up, input_gate=input_gate, normalize=normalize,
                                           initial_state=state)
    assert h.dtype == args[2].dtype
    assert_close(h, h_ref, tol, "h")
    assert_close(final.c, final_ref.c, tol, "final c")
    assert_close(final.n, final_ref.n, tol, "final n")
    np.testing.assert_allclose(final.m, final_ref.m, rtol=1e-5, atol=1e-4, err_msg="final m")


# Reduced foundation grid: every B, T, H and (K, V) value appears with both gates.
FOUNDATION = [
    # B, T, H, K, V, gate
    (1, 1, 1, 16, 16, "exp"),
    (2, 1, 3, 64, 32, "sigmoid"),
    (2, 7, 3, 32, 64, "exp"),
    (1, 7, 1, 64, 32, "sigmoid"),
    (1, 100, 3, 64, 32, "exp"),
    (2, 100, 1, 16, 16, "sigmoid"),
    (2, 100, 3, 32, 64, "sigmoid"),
    (1, 100, 1, 16, 16, "exp"),
]


@pytest.mark.parametrize("B,T,H,K,V,gate", FOUNDATION,
                         ids=[f"B{b}-T{t}-H{h}-K{k}-V{v}-{g}" for b, t, h, k, v, g in FOUNDATION])
def test_foundation_grid(B, T, H, K, V, gate):
    *args, _ = make_inputs(B * 1000 + T, B, T, H, K, V)
    check_against_recurrent(args, None, input_gate=gate)


@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
def test_initial_state(gate):
    """(The foundation grid runs from the zero state.) The sigmoid gate ignores m0."""
    *args, state = make_inputs(7, 2, 37, 2, 32, 32, with_state=True)
    check_against_recurrent(args, state, input_gate=gate)


@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
def test_large_heads(gate):
    """xLSTM-7B head dims (K=256, V=512) at small T; the default config's K/V tiling."""
    *args, state = make_inputs(11, 1, 40, 1, 256, 512, with_state=True)
    check_against_recurrent(args, state, input_gate=gate)


@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128, 256])
def test_chunk_sizes(chunk_size):
    """T >= 4 chunks and not a multiple of the chunk; several query/kv tiles per chunk."""
    T = 4 * chunk_size + 5
    gate = "exp" if chunk_size in (16, 64, 256) else "sigmoid"
    *args, state = make_inputs(chunk_size, 1, T, 1, 16, 32, with_state=True)
    check_against_recurrent(args, state, input_gate=gate, chunk_size=chunk_size)


# Tilings that exercise every loop: K tiles (block_k < K), V tiles, block_kv != block_q, several
# C tiles and sub-blocks in the state kernel.
TILINGS = {
    "kv_gt_q": TilingConfig(chunk_size=64, block_q=16, block_kv=32, block_k=16, block_v=16,
                            states_block_k=16, states_block_v=32, states_block_kv=16),
    "q_gt_kv": TilingConfig(chunk_size=64, block_q=32, block_kv=16, block_k=32, block_v=32,
                            states_block_k=32, states_block_v=16, states_block_kv=32),
}


@pytest.mark.parametrize("name,gate", [("kv_gt_q", "exp"), ("q_gt_kv", "sigmoid")])
def test_tilings(name, gate):
    *args, state = make_inputs(3, 1, 150, 2, 64, 64, with_state=True)
    check_against_recurrent(args, state, input_gate=gate, config=TILINGS[name])


@pytest.mark.parametrize("K,V", [(48, 96), (20, 24)], ids=["K48-V96", "K20-V24-padded"])
def test_odd_head_dims(K, V):
    """Head dims that are no power of two: blocks dividing them, or zero padding to 16."""
    *args, state = make_inputs(5, 1, 50, 2, K, V, with_state=True)
    check_against_recurrent(args, state, input_gate="exp")


def test_sigmoid_unnormalized():
    *args, state = make_inputs(9, 2, 45, 2, 32, 16, with_state=True)
    check_against_recurrent(args, state, input_gate="sigmoid", normalize=False)


@pytest.mark.parametrize("dtype,gate",
                         [(jnp.bfloat16, "exp"), (jnp.bfloat16, "sigmoid"), (jnp.float16, "exp")],
                         ids=["bf16-exp", "bf16-sig", "fp16-exp"])
def test_low_precision(dtype, gate):
    *args, state = make_inputs(13, 2, 70, 2, 32, 64, dtype, with_state=True)
    check_against_recurrent(args, state, input_gate=gate, dtype=dtype, chunk_size=32)


@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
def test_extreme_gates(gate):
    """f~ in [-30, 30], i~ up to +30 and down to -1e4: finite and equal to the reference."""
    q, k, v, *_ = make_inputs(17, 1, 96, 2, 16, 16)
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    f = jax.random.uniform(ks[0], (1, 96, 2), minval=-30.0, maxval=30.0)
    i = jax.random.uniform(ks[1], (1, 96, 2), minval=-30.0, maxval=30.0)
    i = jnp.where(jax.random.bernoulli(ks[2], 0.2, i.shape), -1e4, i)
    i = i.at[:, :20].set(-1e4)  # a run of "write nothing" steps from the start
    check_against_recurrent((q, k, v, i, f), None, input_gate=gate, tol=1e-3)


def _recurrent_rows(q, k, v, i, f, c0, n0, m0, scale):
    """Per-step den (before max/abs) and m of the exp recurrence, in float32 (B, H, T)."""
    def step(carry, x):
        c, n, m = carry
        qt, kt, vt, it, ft = x
        F = jax.nn.log_sigmoid(ft)
        m_new = jnp.maximum(F + m, it)
        fa, ia = jnp.exp(F + m - m_new), jnp.exp(it - m_new)
        c = fa[..., None, None] * c + ia[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = fa[..., None] * n + ia[..., None] * kt
        den = jnp.einsum("bhk,bhk->bh", qt * scale, n)
        return (c, n, m_new), (den, m_new)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, i, f))
    _, (den, m) = jax.lax.scan(step, (c0, n0, m0), xs)
    return jnp.moveaxis(den, 0, -1), jnp.moveaxis(m, 0, -1)


def test_residuals_and_states():
    """den, m_row and the chunk-boundary states (return_states) of `mlstm_fwd`."""
    B, T, H, K, V, L = 1, 64, 2, 16, 32, 16
    q, k, v, i, f, state = make_inputs(21, B, T, H, K, V, with_state=True)
    cfg = TilingConfig.default(K, V, T, jnp.float32, "exp", chunk_size=L)
    h, final, res = mlstm_fwd(q, k, v, i, f, *state, input_gate="exp", normalize=True,
                              config=cfg, interpret=True, return_states=True)
    den, m_row, c_st, n_st, m_st = res
    NC = T // L
    assert c_st.shape == (B, H, NC + 1, K, V) and n_st.shape == (B, H, NC + 1, K)
    assert m_st.shape == (B, H, NC + 1) and den.shape == m_row.shape == (B, H, T)
    den_ref, m_ref = _recurrent_rows(q, k, v, i, f, *state, K ** -0.5)
    assert_close(den, den_ref, 1e-4, "den")
    np.testing.assert_allclose(m_row, m_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(c_st[:, :, 0], state.c, rtol=1e-6)
    np.testing.assert_allclose(m_st[:, :, 0], state.m, rtol=1e-6)
    for name, x, y in (("c", c_st[:, :, -1], final[0]), ("n", n_st[:, :, -1], final[1])):
        np.testing.assert_array_equal(x, y, err_msg=name)
    # The state entering chunk 2 equals the recurrent state after 2 chunks.
    _, mid = ref.mlstm_recurrent(q[:, :2 * L], k[:, :2 * L], v[:, :2 * L], i[:, :2 * L],
                                 f[:, :2 * L], initial_state=state)
    assert_close(c_st[:, :, 2], mid.c, 1e-4, "C_2")
    assert_close(n_st[:, :, 2], mid.n, 1e-4, "n_2")
    np.testing.assert_allclose(m_st[:, :, 2], mid.m, rtol=1e-5, atol=1e-4)


def test_public_api_dispatch():
    """tfla_jax.mlstm(..., implementation='pallas', interpret=True) reaches these kernels."""
    *args, state = make_inputs(23, 1, 33, 2, 16, 16, with_state=True)
    h, st = tfla_jax.mlstm(*args, initial_state=state, return_state=True,
                           implementation="pallas", chunk_size=16, interpret=True)
    h_ref, st_ref = ref.mlstm_recurrent(*args, initial_state=state)
    assert_close(h, h_ref, 1e-4, "h")
    assert_close(st.c, st_ref.c, 1e-4, "c")


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="block_q"):
        TilingConfig(block_q=48)
    with pytest.raises(ValueError, match="chunk_size"):
        TilingConfig(chunk_size=8)
    cfg = TilingConfig.default(256, 512, 8192, jnp.bfloat16, "exp")
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    for K, V, T in ((256, 512, 8192), (96, 192, 100), (64, 64, 1), (20, 24, 7)):
        cfg = TilingConfig.default(K, V, T, jnp.bfloat16, "sigmoid").resolve(K, V)
        assert cfg.chunk_size <= max(16, 1 << (T - 1).bit_length())
        assert cfg.block_q <= cfg.chunk_size and cfg.block_kv <= cfg.chunk_size
    r = TilingConfig(block_k=128, block_v=128).resolve(96, 192)
    assert (r.block_k, r.block_v) == (32, 64)
    *args, _ = make_inputs(0, 1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm_pallas(*args, chunk_size=8, interpret=True)
    with pytest.raises(ValueError, match="disagrees"):
        mlstm_pallas(*args, chunk_size=32, config=TilingConfig(chunk_size=16), interpret=True)
