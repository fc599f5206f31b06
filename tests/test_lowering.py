"""Every shipped kernel configuration lowers for CUDA, on the CPU (design/pallas.md recipe).

Catches what interpret mode accepts and the Triton lowering rejects (non-power-of-two tensors,
rank / dtype errors in dots, unsupported primitives). Not caught: shared-memory overflow, Triton
compile failures and wrong numbers (those need the GPU: benchmarks/check_fwd.py).

To add kernels (e.g. the backward), append `pytest.param(builder, id=...)` to CASES, where
builder() returns (function, tuple of jax.ShapeDtypeStruct arguments).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, PartitionSpec as P, use_abstract_mesh

from tfla_jax import MLSTMState
from tfla_jax.pallas import TilingConfig, mlstm_fwd, mlstm_pallas

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

H100 = AbstractMesh((), (), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu"))


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def fwd_case(B, T, H, K, V, dtype, gate, chunk_size=None):
    """The forward kernels with the shipped default tiling for (K, V, T, dtype, gate)."""
    def build():
        cfg = TilingConfig.default(K, V, T, dtype, gate, chunk_size=chunk_size)
        fn = functools.partial(mlstm_fwd, input_gate=gate, normalize=True, config=cfg,
                               return_states=True)
        args = (_sds((B, T, H, K), dtype), _sds((B, T, H, K), dtype), _sds((B, T, H, V), dtype),
                _sds((B, T, H), jnp.float32), _sds((B, T, H), jnp.float32),
                _sds((B, H, K, V), jnp.float32), _sds((B, H, K), jnp.float32),
                _sds((B, H), jnp.float32))
        return fn, args
    return build


def _id(B, T, H, K, V, dtype, gate, L):
    return f"fwd-B{B}-T{T}-H{H}-K{K}-V{V}-{jnp.dtype(dtype).name}-{gate}-L{L or 'default'}"


_FWD = (
    # xLSTM-7B head shape, both gates, every supported chunk size.
    [(8, 8192, 8, 256, 512, jnp.bfloat16, g, L)
     for g in ("exp", "sigmoid") for L in (None, 16, 32, 64, 128, 256, 512, 1024)]
    # Other head dims and dtypes with their default tiling.
    + [(2, 4096, 4, 64, 64, jnp.bfloat16, "exp", None),
       (2, 2048, 4, 128, 128, jnp.float16, "sigmoid", None),
       (2, 2048, 4, 256, 512, jnp.float16, "exp", None),
       (2, 2048, 4, 256, 512, jnp.float32, "exp", None),
       (2, 1024, 4, 96, 192, jnp.bfloat16, "exp", None),
       (1, 512, 2, 512, 512, jnp.bfloat16, "exp", None),
       (2, 256, 2, 64, 128, jnp.float32, "exp", None),
       (1, 16, 1, 16, 16, jnp.float32, "sigmoid", None)]
)

CASES = [pytest.param(fwd_case(*c), id=_id(*c)) for c in _FWD]


@pytest.mark.parametrize("case", CASES)
def test_lowers_for_cuda(case):
    fn, args = case()
    with use_abstract_mesh(H100):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text, "no Triton kernel in the lowered module"


def _grad_of_public_op(B, T, H, K, V, dtype, gate, L=None, keep_states=False):
    """jax.grad through `mlstm_pallas` (custom_vjp: forward and backward kernels)."""
    cfg = TilingConfig.default(K, V, T, dtype, gate, chunk_size=L).with_keep_states(keep_states)

    def loss(q, k, v, i, f, c0, n0, m0):
        h, s = mlstm_pallas(q, k, v, i, f, input_gate=gate, initial_state=MLSTMState(c0, n0, m0),
                            config=cfg)
        return jnp.sum(h.astype(jnp.float32)) + jnp.sum(s.c) + jnp.sum(s.n)

    args = (_sds((B, T, H, K), dtype), _sds((B, T, H, K), dtype), _sds((B, T, H, V), dtype),
            _sds((B, T, H), jnp.float32), _sds((B, T, H), jnp.float32),
            _sds((B, H, K, V), jnp.float32), _sds((B, H, K), jnp.float32),
            _sds((B, H), jnp.float32))
    return jax.grad(loss, argnums=tuple(range(8))), args


_VJP = [(8, 8192, 8, 256, 512, jnp.bfloat16, g, L, keep)
        for g in ("exp", "sigmoid") for L, keep in ((None, False), (128, False), (256, True))]
_VJP += [(2, 1000, 4, 96, 192, jnp.bfloat16, "exp", None, False),
         (2, 512, 2, 64, 64, jnp.float32, "sigmoid", 64, False)]


@pytest.mark.parametrize("case", _VJP, ids=lambda c: "vjp-" + _id(*c[:8]).removeprefix("fwd-")
                         + ("-keep" if c[8] else ""))
def test_custom_vjp_lowers_for_cuda(case):
    fn, args = _grad_of_public_op(*case)
    with use_abstract_mesh(H100):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 6, "expected forward and backward kernels"


def test_shard_map_with_vma_checks_lowers_for_cuda():
    # The default check_vma=True path (the kernels' outputs declare how they vary over the mesh);
    # interpret mode cannot run it on CPU, so it is lowered for CUDA here.
    mesh = AbstractMesh((2, 2), ("data", "heads"),
                        abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu"))
    seq, gate = P("data", None, "heads", None), P("data", None, "heads")
    op = jax.shard_map(lambda *a: mlstm_pallas(*a, chunk_size=64)[0], mesh=mesh,
                       in_specs=(seq, seq, seq, gate, gate), out_specs=seq)
    loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
    sds = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
        shape, jnp.dtype(dtype), sharding=jax.sharding.NamedSharding(mesh, spec))
    args = (sds((4, 256, 4, 64), jnp.bfloat16, seq), sds((4, 256, 4, 64), jnp.bfloat16, seq),
            sds((4, 256, 4, 128), jnp.bfloat16, seq), sds((4, 256, 4), jnp.float32, gate),
            sds((4, 256, 4), jnp.float32, gate))
    with use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
