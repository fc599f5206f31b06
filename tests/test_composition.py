"""Every kernel backend through `tfla_jax.mlstm` (the one custom_vjp; interpret mode on CPU)
composes with jit, grad, vmap, checkpoint, lax.scan over layers and shard_map; every check is
against the lax.scan reference. (Chained calls are in the shared suite, test_backends.py.)"""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfla_jax import MLSTMState, mlstm
import tfla_jax
from tests.utils import assert_close, make_inputs, random_like, rel_err

B, T, H, K, V, L = 2, 40, 2, 16, 32, 16
NAMES = ["q", "k", "v", "i", "f", "c0", "n0", "m0"]


def pallas(*args, **kw):
    kw.setdefault("chunk_size", L)
    return mlstm(*args, implementation="pallas_triton", interpret=True, **kw)


def recurrent(*args, **kw):
    return mlstm(*args, implementation="recurrent", **kw)


def _loss(fn, gate="exp"):
    def loss(args, cot):
        h, s = fn(*args[:5], initial_state=MLSTMState(*args[5:]), return_state=True,
                  input_gate=gate)
        return jnp.sum(h * cot[0]) + jnp.sum(s.c * cot[1]) + jnp.sum(s.n * cot[2])
    return loss


@pytest.fixture(scope="module")
def data():
    q, k, v, i, f, s = make_inputs(21, B, T, H, K, V, jnp.float32, with_state=True)
    cot = random_like(22, (jnp.zeros((B, T, H, V)), s.c, s.n))
    return (q, k, v, i, f, *s), cot


def assert_grads_close(g, g_ref, tol, what):
    for name, a, b in zip(NAMES, g, g_ref):
        err = rel_err(a, b)
        assert np.all(np.isfinite(np.asarray(a))), f"{what} d{name} not finite"
        assert err <= tol, f"{what} d{name}: relative RMS {err:.2e} > {tol:.0e}"


def test_jit_grad_matches_scan(data):
    args, cot = data
    g = jax.jit(jax.grad(_loss(pallas)))(args, cot)
    g_ref = jax.jit(jax.grad(_loss(recurrent)))(args, cot)
    assert_grads_close(g, g_ref, 1e-4, "jit(grad)")


def test_keep_states_equals_recompute(data):
    args, cot = data
    cfg = tfla_jax.TritonConfig.default(K, V, T, jnp.float32, chunk_size=L)
    keep = functools.partial(pallas, chunk_size=None,
                             config=dataclasses.replace(cfg, keep_states=True))
    g_keep = jax.jit(jax.grad(_loss(keep)))(args, cot)
    g = jax.jit(jax.grad(_loss(pallas)))(args, cot)
    assert_grads_close(g_keep, g, 1e-6, "keep_states")


def test_checkpoint_and_vmap(data):
    args, cot = data
    g_ref = jax.grad(_loss(recurrent))(args, cot)
    g_remat = jax.jit(jax.grad(jax.checkpoint(_loss(pallas))))(args, cot)
    assert_grads_close(g_remat, g_ref, 1e-4, "checkpoint")
    # vmap over a leading axis of two problems.
    stacked = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), (args, cot))
    gv = jax.jit(jax.vmap(jax.grad(_loss(pallas))))(*stacked)
    for j in range(2):
        one = jax.tree.map(lambda x: x[j], stacked)
        assert_grads_close([x[j] for x in gv], jax.grad(_loss(recurrent))(*one), 1e-4, f"vmap[{j}]")


def test_scan_over_layers(data):
    args, _ = data
    q, k, v, i, f = args[:5]
    w = jax.random.normal(jax.random.key(0), (3, V, V)) / np.sqrt(V)  # 3 layers

    def net(fn, w, q):
        def layer(x, w_l):  # x: (B, T, H, V) -> values of the next layer
            h, _ = fn(q, k, x @ w_l, i, f)
            return h, None
        out, _ = jax.lax.scan(layer, v, w)
        return jnp.sum(out ** 2)

    g = jax.jit(jax.grad(functools.partial(net, pallas), argnums=(0, 1)))(w, q)
    g_ref = jax.jit(jax.grad(functools.partial(net, recurrent), argnums=(0, 1)))(w, q)
    assert_close(g, g_ref, 1e-4, "scan over layers")


_SHARD_MAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from tfla_jax import mlstm
    from tests.utils import make_inputs, rel_err
    assert len(jax.devices()) == 4, jax.devices()
    q, k, v, i, f, _ = make_inputs(3, 4, 40, 4, 16, 32, jnp.float32)
    mesh = jax.make_mesh((2, 2), ("data", "heads"))
    seq, gate = P("data", None, "heads", None), P("data", None, "heads")
    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    args = (q, k, v, i, f)
    sharded_args = [put(x, seq) for x in (q, k, v)] + [put(x, gate) for x in (i, f)]

    def loss(fn, q, k, v, i, f):
        return jnp.sum(fn(q, k, v, i, f) ** 2)

    op = lambda *a: mlstm(*a, implementation="pallas_triton", interpret=True, chunk_size=16)[0]
    # check_vma=False: Pallas interpret mode cannot track varying axes through its loops (a JAX
    # limitation); the default check_vma=True path is lowered for CUDA in test_lowering.py.
    sharded = jax.shard_map(op, mesh=mesh, in_specs=(seq, seq, seq, gate, gate), out_specs=seq,
                            check_vma=False)
    g = jax.jit(jax.grad(lambda *a: loss(sharded, *a), argnums=(0, 1, 2, 3, 4)))(*sharded_args)
    ref = lambda *a: mlstm(*a, implementation="recurrent")[0]
    g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2, 3, 4))(*args)
    errs = [rel_err(a, b) for a, b in zip(g, g_ref)]
    print("errors", errs)
    assert max(errs) <= 1e-4, errs
""")


def test_shard_map_over_batch_and_heads_on_4_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
