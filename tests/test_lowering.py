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
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from tfla_jax.pallas import TilingConfig, mlstm_fwd

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
# Backward kernels: CASES += [pytest.param(bwd_case(...), id="bwd-...") ...]


@pytest.mark.parametrize("case", CASES)
def test_lowers_for_cuda(case):
    fn, args = case()
    with use_abstract_mesh(H100):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text, "no Triton kernel in the lowered module"
