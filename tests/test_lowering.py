"""Every shipped kernel configuration lowers for CUDA on the CPU, forward and backward.

Interpret mode accepts code the hardware lowering rejects; lowering for CUDA catches
non-power-of-two tensors, rank / dtype errors in dots and unsupported primitives. Not caught:
shared-memory overflow, compile failures and wrong numbers (those need the GPU:
`pytest --gpu tests/test_backends.py` and benchmarks/bench_mlstm.py --check-only).
New kernel backends are picked up from the registry.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, PartitionSpec as P, use_abstract_mesh

import tfla_jax
from tfla_jax import MLSTMState
from tfla_jax.backends import Call
from tfla_jax.backends.mosaic.config import padded_head_dim as mosaic_padded_head_dim

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

H200 = AbstractDevice("NVIDIA H200", 132, "gpu")
KERNELS = tfla_jax.available_backends()
# Per backend: {custom-call target: how many kernels a forward + backward lowers to}.
CALLS = {"pallas_triton": {"__gpu$xla.gpu.triton": 7},
         # bf16, K and V multiples of 64: the Mosaic forward (chunk states, output), the reverse
         # state recurrence on the kept chunk states, dv, dq and dk: every kernel Mosaic.
         "pallas_mosaic_gpu": {"mosaic_gpu_v2": 6, "__gpu$xla.gpu.triton": 0}}
CALLS_FP16 = {**CALLS, "pallas_mosaic_gpu": {"mosaic_gpu_v2": 3, "__gpu$xla.gpu.triton": 3}}
# bf16 with padded head dims (V <= 256 here): dk on Triton.
CALLS_PADDED = {**CALLS, "pallas_mosaic_gpu": {"mosaic_gpu_v2": 5, "__gpu$xla.gpu.triton": 1}}
# (B, T, H, K, V, dtype, input gate, chunk size or None = the default)
SHIPPED = (
    [(8, 8192, 8, 256, 512, jnp.bfloat16, g, L)
     for g in ("exp", "sigmoid") for L in (None, 16, 32, 64, 128, 256, 512, 1024)]
    + [(2, 4096, 4, 64, 64, jnp.bfloat16, "exp", None),
       (2, 2048, 4, 128, 128, jnp.float16, "sigmoid", None),
       (2, 2048, 4, 256, 512, jnp.float16, "exp", None),
       (2, 2048, 4, 256, 512, jnp.float32, "exp", None),
       (2, 1000, 4, 96, 192, jnp.bfloat16, "exp", None),
       (1, 512, 2, 512, 512, jnp.bfloat16, "exp", None),
       (2, 256, 2, 64, 128, jnp.float32, "sigmoid", None),
       (1, 7, 1, 20, 24, jnp.bfloat16, "exp", None),
       # more than 256 chunks: the per-chunk decays exceed one TMA copy
       (1, 65536, 2, 256, 512, jnp.bfloat16, "sigmoid", 128)])


def _sds(shape, dtype, sharding=None):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def _args(B, T, H, K, V, dtype):
    return (_sds((B, T, H, K), dtype), _sds((B, T, H, K), dtype), _sds((B, T, H, V), dtype),
            _sds((B, T, H), jnp.float32), _sds((B, T, H), jnp.float32),
            _sds((B, H, K, V), jnp.float32), _sds((B, H, K), jnp.float32),
            _sds((B, H), jnp.float32))


def _value_and_grad(impl, gate, L, config=None):
    def loss(q, k, v, i, f, c0, n0, m0):
        h, s = tfla_jax.mlstm(q, k, v, i, f, input_gate=gate, initial_state=MLSTMState(c0, n0, m0),
                              return_state=True, implementation=impl, chunk_size=L,
                              config=config)
        return jnp.sum(h.astype(jnp.float32)) + jnp.sum(s.c) + jnp.sum(s.n)
    return jax.value_and_grad(loss, argnums=tuple(range(8)))


def _lower(fn, args, device=H200):
    with use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _id(c):
    B, T, H, K, V, dtype, gate, L = c
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-{jnp.dtype(dtype).name}-{gate}-L{L or 'default'}"


@pytest.mark.parametrize("case", SHIPPED, ids=_id)
@pytest.mark.parametrize("impl", KERNELS)
def test_forward_and_backward_lower_for_cuda(impl, case):
    """Every case the backend accepts lowers to its kernels; a case it declines is a ValueError
    that names the implementation and the backend's reason."""
    B, T, H, K, V, dtype, gate, L = case
    backend = tfla_jax.get_backend(impl)
    call = Call(B=B, T=T, H=H, K=K, V=V, dtype=jnp.dtype(dtype), input_gate=gate, normalize=True,
                platform="cuda", device_kind=H200.device_kind, interpret=False)
    reason = backend.supported(call, backend.default_config(call, chunk_size=L))
    if reason is not None:
        with pytest.raises(ValueError, match="implementation: .*" + re.escape(reason)):
            _lower(_value_and_grad(impl, gate, L), _args(B, T, H, K, V, dtype))
        return
    text = _lower(_value_and_grad(impl, gate, L), _args(B, T, H, K, V, dtype))
    padded = (mosaic_padded_head_dim(K), mosaic_padded_head_dim(V)) != (K, V)
    calls = (CALLS_FP16 if jnp.dtype(dtype) == jnp.float16 else
             CALLS_PADDED if padded else CALLS)
    for target, count in calls.get(impl, {}).items():
        assert text.count(target) == count, f"expected {count} {target} kernels (fwd + bwd)"


@pytest.mark.parametrize("impl,overrides,calls", [
    ("pallas_triton", {"keep_states": True}, {"__gpu$xla.gpu.triton": 6}),
    ("pallas_mosaic_gpu", {"keep_states": False}, {"mosaic_gpu_v2": 2, "__gpu$xla.gpu.triton": 5}),
    ("pallas_mosaic_gpu", {"mosaic_state_grads": False},
     {"mosaic_gpu_v2": 2, "__gpu$xla.gpu.triton": 4}),
    ("pallas_mosaic_gpu", {"mosaic_dv": False}, {"mosaic_gpu_v2": 5, "__gpu$xla.gpu.triton": 1}),
    ("pallas_mosaic_gpu", {"mosaic_dk": False}, {"mosaic_gpu_v2": 4, "__gpu$xla.gpu.triton": 2})])
def test_config_variants_lower_for_cuda(impl, overrides, calls):
    """Configs off their defaults. keep_states: kept, the backward takes the forward's chunk
    states (one kernel fewer); not kept, it recomputes them. mosaic_state_grads off: the
    backward's reverse state recurrence on Triton's kernel instead of the Mosaic one;
    mosaic_dv off: dv on Triton's kernel; mosaic_dk off: dk, and with it dq at V = 512, on
    Triton's kernels."""
    backend = tfla_jax.backends.get_backend(impl)
    cfg = backend.config_cls.default(256, 512, 8192, jnp.bfloat16, chunk_size=256)
    text = _lower(_value_and_grad(impl, "exp", None,
                                  config=cfg.__class__(**{**cfg.__dict__, **overrides})),
                  _args(8, 8192, 8, 256, 512, jnp.bfloat16))
    for target, count in calls.items():
        assert text.count(target) == count, f"{overrides}: expected {count} {target}"


def test_export_for_cuda_from_cpu():
    """jax.export of a named kernel backend for a GPU, from a machine without one. Triton kernels
    carry no serialization-compatibility guarantee, so jax asks for that check to be waived."""
    fn = lambda *a: tfla_jax.mlstm(*a, implementation="pallas_triton")[0]  # noqa: E731
    waive = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with use_abstract_mesh(AbstractMesh((), (), abstract_device=H200)):
        exported = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=waive)(
            *_args(2, 300, 2, 64, 128, jnp.bfloat16)[:5])
    assert exported.platforms == ("cuda",)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_shard_map_with_vma_checks_lowers_for_cuda():
    # The default check_vma=True path (kernel outputs declare how they vary over the mesh);
    # interpret mode cannot run it on CPU, so it is lowered for CUDA here.
    mesh = AbstractMesh((2, 2), ("data", "heads"), abstract_device=H200)
    seq, gate = P("data", None, "heads", None), P("data", None, "heads")
    op = jax.shard_map(lambda *a: tfla_jax.mlstm(*a, implementation="pallas_triton",
                                                 chunk_size=64)[0],
                       mesh=mesh, in_specs=(seq, seq, seq, gate, gate), out_specs=seq)
    loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))  # noqa: E731
    sh = lambda spec: jax.sharding.NamedSharding(mesh, spec)  # noqa: E731
    args = (_sds((4, 256, 4, 64), jnp.bfloat16, sh(seq)), _sds((4, 256, 4, 64), jnp.bfloat16, sh(seq)),
            _sds((4, 256, 4, 128), jnp.bfloat16, sh(seq)), _sds((4, 256, 4), jnp.float32, sh(gate)),
            _sds((4, 256, 4), jnp.float32, sh(gate)))
    with use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("impl", KERNELS)
def test_segment_ids_lower_for_cuda(impl):
    """Packed sequences reach the kernels through the gate vectors only: the same kernels."""
    def loss(q, k, v, i, f, ids):
        h, _ = tfla_jax.mlstm(q, k, v, i, f, implementation=impl, segment_ids=ids)
        return jnp.sum(h.astype(jnp.float32))

    args = (*_args(2, 300, 2, 64, 128, jnp.bfloat16)[:5], _sds((2, 300), jnp.int32))
    text = _lower(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), args)
    for target, count in CALLS.get(impl, {}).items():
        assert text.count(target) == count
