"""Context-parallel cases on a simulated 8-device CPU mesh, run in one subprocess by
tests/test_context.py (XLA_FLAGS must be set before jax is imported).

    PYTHONPATH=. python -m tests.context_cases [--only NAME]   # prints one JSON line per case

Each case: h, the final state and every gradient (q, k, v, i, f, initial state) of one
`tfla_jax.mlstm` call inside `jax.shard_map` with T split over the axis "ctx", against the same
call unsharded. The loss is sum(h dh) + <c_T, dc> + <n_T, dn> with random cotangents.
"""

import os

if __name__ == "__main__":   # the subprocess only: importing the cases must not change the caller
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import tfla_jax  # noqa: E402
from tests.utils import common_stabiliser, make_inputs, random_like, rel_err  # noqa: E402

warnings.filterwarnings("ignore", "The Pallas Triton backend is deprecated")

B, T, H, K, V = 2, 64, 2, 16, 32
TOL_H, TOL_GRAD = 2e-5, 1e-4


def segment_ids(n_dev):
    """Row 0: starts inside blocks and one exactly at every block edge; row 1: starts inside
    blocks only, one sequence crossing several edges, and a repeated id across an edge."""
    edge = T // max(n_dev, 4)
    row0 = np.cumsum(np.isin(np.arange(T), [3, 13, 29, 45] + list(range(edge, T, edge))))
    row1 = np.repeat([5, 6, 5, 9], [edge + 3, 2, 2 * edge - 5, T - 3 * edge])
    return jnp.asarray(np.stack([row0, row1]), jnp.int32)


CASES = {
    # name: (devices, implementation, chunk, input gate, initial state, segments, extreme gates)
    "chunkwise-4-exp": (4, "chunkwise", 8, "exp", True, True, None),
    "chunkwise-4-sigmoid-nostate": (4, "chunkwise", 16, "sigmoid", False, True, None),
    "chunkwise-8-mixture": (8, "chunkwise", 8, "exp", True, True, "mixture"),
    "chunkwise-1": (1, "chunkwise", 8, "exp", True, True, None),
    "pallas-4-exp": (4, "pallas_triton", 16, "exp", True, True, None),
    "pallas-8-sigmoid": (8, "pallas_triton", 16, "sigmoid", True, True, None),   # L > T/8: padded
}


def _extreme(q):
    """(i~, f~) of the numerics table's mixture case: f~ in {-1e4 (a hard reset), -100, +100,
    N(3, 1)}, i~ in {+80, -1e4, -inf, N(0, 1)}, at random positions (block edges included)."""
    rng = np.random.default_rng(5)
    shape = q.shape[:-1]
    f = rng.choice([-1e4, -100.0, 100.0, np.nan], size=shape)
    f = np.where(np.isnan(f), rng.normal(3.0, 1.0, size=shape), f)
    i = rng.choice([80.0, -1e4, -np.inf, np.nan], size=shape)
    return np.where(np.isnan(i), rng.normal(size=shape), i), f


def run_case(name):
    n_dev, impl, L, gate, with_state, with_segments, extreme = CASES[name]
    q, k, v, i, f, state = make_inputs(7, B, T, H, K, V, with_state=True)
    if extreme:
        i, f = (jnp.asarray(x, jnp.float32) for x in _extreme(q))
    ids = segment_ids(n_dev) if with_segments else None
    dh = random_like(1, v)
    dc, dn = random_like(2, (state.c, state.n))
    kw = dict(implementation=impl, chunk_size=L, input_gate=gate, return_state=True)
    if impl == "pallas_triton":
        kw["interpret"] = True
    mesh = Mesh(np.asarray(jax.devices()[:n_dev]), ("ctx",))
    seq = P(None, "ctx")

    # Pallas interpret mode cannot track varying axes through its loops (a JAX limitation, as
    # in test_composition.py): those cases run unchecked, the XLA ones with the default checks.
    check_vma = impl != "pallas_triton"

    def sharded(q, k, v, i, f, st, ids):
        return jax.shard_map(
            lambda q, k, v, i, f, st, ids: tfla_jax.mlstm(
                q, k, v, i, f, initial_state=st, segment_ids=ids, context_axis="ctx", **kw),
            mesh=mesh, in_specs=(seq, seq, seq, seq, seq, P(), None if ids is None else seq),
            out_specs=(seq, P()), check_vma=check_vma)(q, k, v, i, f, st, ids)

    def plain(q, k, v, i, f, st, ids):
        return tfla_jax.mlstm(q, k, v, i, f, initial_state=st, segment_ids=ids, **kw)

    def value_and_grads(call):
        def loss(q, k, v, i, f, st):
            h, fin = call(q, k, v, i, f, st if with_state else None, ids)
            return jnp.sum(h * dh) + jnp.sum(fin.c * dc) + jnp.sum(fin.n * dn), (h, fin)

        grad = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)
        (_, out), grads = jax.jit(grad)(q, k, v, i, f, state)
        return out, grads

    t0 = time.perf_counter()
    (h, fin), grads = value_and_grads(sharded)
    (h_ref, fin_ref), grads_ref = value_and_grads(plain)
    errs = {"h": rel_err(h, h_ref)}
    (c, n), (c_ref, n_ref) = common_stabiliser(fin, fin_ref)
    errs["c_T"], errs["n_T"] = rel_err(c, c_ref), rel_err(n, n_ref)
    for gname, g, w in zip(("q", "k", "v", "i", "f"), grads[:5], grads_ref[:5]):
        errs["d" + gname] = rel_err(g, w)
    if with_state:
        for field in ("c", "n") + (("m",) if gate == "exp" else ()):
            errs["d" + field + "0"] = rel_err(getattr(grads[5], field),
                                              getattr(grads_ref[5], field))
    finite = bool(all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((h, fin, grads))))
    ok = finite and all(e <= (TOL_H if q_ == "h" else TOL_GRAD) for q_, e in errs.items())
    return dict(case=name, ok=ok, finite=finite, errors=errs, seconds=time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", action="append", help="run these cases (default: all)")
    args = p.parse_args()
    for name in args.only or CASES:
        print(json.dumps(run_case(name)), flush=True)


if __name__ == "__main__":
    main()
