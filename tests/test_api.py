"""The public API: input validation (design §7), defaults, and composition with jit/vmap/grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfla_jax
from tfla_jax import MLSTMState, mlstm, mlstm_step
from tests.utils import assert_close, make_inputs

B, T, H, K, V = 2, 9, 3, 8, 16


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(0, B, T, H, K, V, jnp.float32, with_state=True)


def _bad_calls(q, k, v, i, f, s):
    """(argument name, call) pairs that must raise a ValueError naming the argument."""
    good = dict(q=q, k=k, v=v, i=i, f=f)

    def with_(**kw):
        return {**good, **kw}

    zeros = jnp.zeros
    return [
        ("q", with_(q=q[0])),
        ("k", with_(k=zeros((B, T, H, K + 1)))),
        ("k", with_(k=zeros((B, T + 1, H, K)))),
        ("v", with_(v=zeros((B, T, H + 1, V)))),
        ("v", with_(v=zeros((B, T, H)))),
        ("i", with_(i=zeros((B, T)))),
        ("f", with_(f=zeros((B, T, H, 1)))),
        ("q", with_(q=q.astype(jnp.int32))),
        ("q, k, v", with_(q=q.astype(jnp.bfloat16))),
        ("i", with_(i=np.asarray(i).tolist())),
    ]


def test_bad_arrays_name_the_argument(inputs):
    q, k, v, i, f, s = inputs
    for name, kwargs in _bad_calls(q, k, v, i, f, s):
        with pytest.raises(ValueError, match=name.replace(",", r"\,")):
            mlstm(**kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(input_gate="tanh"), "input_gate"),
    (dict(normalize=False), "normalize"),  # only the sigmoid gate may drop the normaliser
    (dict(normalize="yes", input_gate="sigmoid"), "normalize"),
    (dict(chunk_size=48), "chunk_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=16.0), "chunk_size"),
    (dict(implementation="triton"), "implementation"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(scale=float("inf")), "scale"),
    (dict(config=object()), "config"),
    (dict(config=tfla_jax.TritonConfig(), implementation="chunkwise"), "config"),
    (dict(config=tfla_jax.TritonConfig(chunk_size=32), chunk_size=64,
          implementation="pallas_triton", interpret=True), "chunk_size"),
    (dict(scale=0.0), "scale"),
    (dict(scale=-1.0), "scale"),
    (dict(interpret="yes"), "interpret"),
    (dict(eps=True), "eps"),                      # bools are not numbers here
    (dict(scale=np.bool_(True)), "scale"),
    (dict(scale=np.float32("nan")), "scale"),
    (dict(chunk_size=True), "chunk_size"),
    (dict(chunk_size=np.float64(16)), "chunk_size"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_options_name_the_argument(inputs, kwargs, name):
    q, k, v, i, f, _ = inputs
    with pytest.raises(ValueError, match=name):
        mlstm(q, k, v, i, f, **kwargs)


def test_numpy_and_jax_scalars_are_accepted(inputs):
    """eps, scale and chunk_size may be NumPy (or concrete 0-d JAX) scalars: same result."""
    q, k, v, i, f, s = inputs
    want, _ = mlstm(q, k, v, i, f, eps=1e-3, scale=0.25, chunk_size=4)
    got, _ = mlstm(q, k, v, i, f, eps=np.float32(1e-3), scale=jnp.float32(0.25),
                   chunk_size=np.int64(4))
    assert_close(got, want, 1e-6, "numpy scalars")
    args = (q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], s)
    want, _ = mlstm_step(*args, eps=float(np.float32(1e-3)), scale=0.25)
    got, _ = mlstm_step(*args, eps=np.float32(1e-3), scale=np.float64(0.25))
    assert_close(got, want, 0.0, "numpy scalars, step")


def test_bad_state_names_the_argument(inputs):
    q, k, v, i, f, s = inputs
    with pytest.raises(ValueError, match="initial_state"):
        mlstm(q, k, v, i, f, initial_state=(s.c, s.n, s.m))
    with pytest.raises(ValueError, match=r"initial_state\.c"):
        mlstm(q, k, v, i, f, initial_state=s._replace(c=s.c[..., :-1]))
    with pytest.raises(ValueError, match=r"initial_state\.m"):
        mlstm(q, k, v, i, f, initial_state=s._replace(m=s.m[:, :, None]))
    with pytest.raises(ValueError, match=r"state\.n"):
        mlstm_step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], s._replace(n=s.n[:1]))
    with pytest.raises(ValueError, match="q"):
        mlstm_step(q, k, v, i, f, s)


@pytest.mark.parametrize("impl", ["pallas", *tfla_jax.available_backends()])
def test_kernels_without_gpu_are_a_clear_error(inputs, impl):
    """A named kernel backend traces anywhere (cross-lowering); compiling it for the CPU without
    interpret=True fails at that point, naming the fix."""
    if jax.default_backend() == "gpu":
        pytest.skip("this checks the message on machines without a GPU")
    q, k, v, i, f, _ = inputs
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))   # a dtype every kernel backend takes
    with pytest.raises(ValueError, match=r"implementation: .*interpret=True"):
        mlstm(q, k, v, i, f, implementation=impl)
    jax.jit(lambda *a: mlstm(*a, implementation=impl)[0]).trace(q, k, v, i, f)  # traces fine


def test_kernel_backend_declines_with_a_reason(inputs):
    q, k, v, i, f, _ = inputs
    up = [x.astype(jnp.float64) for x in (q, k, v, i, f)] if jax.config.jax_enable_x64 else None
    if up is not None:  # no float64 kernels: named, it declines; "pallas"/None take chunkwise
        with pytest.raises(ValueError, match="implementation: .*pallas_triton.*dtype float64"):
            mlstm(*up, implementation="pallas_triton", interpret=True)
        h, _ = mlstm(*up, implementation="pallas", interpret=True)
        assert h.dtype == jnp.float64
    with pytest.raises(ValueError, match="config"):
        mlstm(q, k, v, i, f, implementation="pallas_triton", config=object(), interpret=True)


@pytest.mark.parametrize("device, K, V, dtype, want", [
    ("NVIDIA H200", 256, 512, jnp.bfloat16, "pallas_mosaic_gpu"),
    ("NVIDIA H100 80GB HBM3", 256, 256, jnp.float16, "pallas_mosaic_gpu"),
    ("NVIDIA H200", 128, 128, jnp.bfloat16, "pallas_triton"),    # measured faster there
    ("NVIDIA H200", 256, 512, jnp.float32, "pallas_triton"),     # Mosaic declines fp32
    ("NVIDIA H200", 512, 512, jnp.bfloat16, "pallas_triton"),    # and K > 256
    ("NVIDIA A100-SXM4-80GB", 256, 512, jnp.bfloat16, "pallas_triton"),   # not Hopper
])
def test_the_choice_on_gpus(device, K, V, dtype, want):
    from tfla_jax import api, backends
    call = backends.Call(B=8, T=8192, H=8, K=K, V=V, dtype=jnp.dtype(dtype), input_gate="exp",
                         normalize=True, platform="gpu", device_kind=device, interpret=False)
    for implementation in (None, "pallas"):
        assert api._choose(implementation, None, None, call).name == want


def test_config_is_validated_at_construction():
    for field, bad in (("chunk_size", 48), ("block_q", 8), ("num_warps", 3), ("num_stages", 0),
                       ("bwd_block_k_out", 96), ("keep_states", 1)):
        with pytest.raises(ValueError, match=f"TritonConfig.{field}"):
            tfla_jax.TritonConfig(**{field: bad})
    cfg = tfla_jax.TritonConfig.default(96, 200, 1000, jnp.bfloat16)
    assert cfg.chunk_size == 256 and cfg == tfla_jax.TritonConfig(**cfg.__dict__)
    assert hash(cfg) == hash(tfla_jax.TritonConfig(**cfg.__dict__))  # a jit static argument


def test_registry_and_lazy_models():
    assert "pallas_triton" in tfla_jax.available_backends()
    assert tfla_jax.get_backend("pallas_triton").config_cls is tfla_jax.TritonConfig
    assert set(tfla_jax.available_backends()) <= set(tfla_jax.implementations())
    code = ("import sys, tfla_jax; assert 'flax' not in sys.modules and 'safetensors' not in "
            "sys.modules, sorted(m for m in sys.modules if m.startswith(('flax', 'safe'))); "
            "tfla_jax.layers.xLSTMConfig; assert 'flax' in sys.modules")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_defaults(inputs):
    q, k, v, i, f, _ = inputs
    h, state = mlstm(q, k, v, i, f)
    assert state is None and h.shape == (B, T, H, V) and h.dtype == jnp.float32
    h_ref, s_ref = mlstm(q, k, v, i, f, implementation="recurrent", return_state=True)
    assert_close(h, h_ref, 1e-5, "default implementation")
    # scale defaults to K**-0.5 and is applied to q only.
    h2, _ = mlstm(q * K ** -0.5, k, v, i, f, scale=1.0)
    assert_close(h2, h, 1e-6, "scale")
    # the zero initial state is the default.
    zero = tfla_jax.ref.zero_state(B, H, K, V)
    h3, s3 = mlstm(q, k, v, i, f, initial_state=zero, return_state=True)
    assert_close((h3, *s3), (h_ref, *s_ref), 1e-5, "zero state")
    if jax.default_backend() != "gpu":  # implementation=None always runs; a kernel config is moot
        h4, _ = mlstm(q, k, v, i, f, config=tfla_jax.TritonConfig())
        assert_close(h4, h_ref, 1e-5, "default implementation with a config")


def test_jit_vmap_grad_compose(inputs):
    q, k, v, i, f, s = inputs

    def loss(q, k, v, i, f):
        h, st = mlstm(q, k, v, i, f, initial_state=s, return_state=True, chunk_size=4)
        return jnp.sum(h ** 2) + jnp.sum(st.c)

    g_jit = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, i, f)
    g_eager = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, i, f)
    assert_close(g_jit, g_eager, 1e-5, "jit(grad)")
    assert all(float(jnp.abs(g).max()) > 0 for g in g_jit)

    # vmap over an extra leading axis equals a Python loop over it.
    xs = [jnp.stack([x, 0.5 * x]) for x in (q, k, v, i, f)]
    hv = jax.vmap(lambda *a: mlstm(*a, chunk_size=4)[0])(*xs)
    for j in range(2):
        assert_close(hv[j], mlstm(*(x[j] for x in xs), chunk_size=4)[0], 1e-5, f"vmap[{j}]")

    # the step composes too (the decoding path).
    step = jax.jit(lambda *a: mlstm_step(*a))
    h, st = step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], s)
    assert isinstance(st, MLSTMState) and st.c.dtype == jnp.float32 and h.shape == (B, H, V)


_EXAMPLE_CHECK = """
import jax, jax.numpy as jnp
import tfla_jax
from tests.utils import make_inputs, rel_err
exec(compile(CODE, "docs/backends.md", "exec"))
assert "xla_chunked" in tfla_jax.implementations()
q, k, v, i, f, s = make_inputs(0, 2, 100, 2, 16, 24, with_state=True)
for gate in ("exp", "sigmoid"):
    def loss(impl):
        def l(a):
            h, st = tfla_jax.mlstm(*a[:5], initial_state=tfla_jax.MLSTMState(*a[5:]),
                                   return_state=True, input_gate=gate, implementation=impl)
            return jnp.sum(h * jnp.cos(jnp.arange(24))) + jnp.sum(st.c) + jnp.sum(st.n * 0.5)
        return l
    a = (q, k, v, i, f, *s)
    (l1, g1), (l0, g0) = (jax.value_and_grad(loss(x))(a) for x in ("xla_chunked", "recurrent"))
    errs = [rel_err(l1, l0)] + [rel_err(x, y) for x, y in zip(g1, g0)]
    assert max(errs) < 1e-4, (gate, errs)
"""


def test_docs_example_backend():
    """The backend written out in docs/backends.md registers and matches the recurrence."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "backends.md")).read()
    code = re.search(r'```python\n("""tfla_jax/backends/xla_chunked.*?)```', text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", f"CODE = {code!r}\n" + _EXAMPLE_CHECK], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
