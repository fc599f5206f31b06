"""GPU probe: the Mosaic chunk-state kernel alone at the headline shape, per tiling (one or two
compute warpgroups per CTA, block_v, TMA stages), device time per call (batched), with the
bytes the CTAs bring in and the states' agreement with the one-warpgroup tiling.

    PYTHONPATH=. python3 benchmarks/probe_states.py [--old .scratch/states_old.py]  # $OUT/probe_states.json
--old: also time an earlier copy of states.py (same signature minus `warpgroups`).
"""
import argparse
import functools
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from tfla_jax import ref  # noqa: E402
from tfla_jax.backends.mosaic.config import warpgroup_split  # noqa: E402
from tfla_jax.backends.mosaic.states import state_recurrence  # noqa: E402



def reference(k, v, w, w2, decay, c0, n0, L):
    """States, n and the last state by a float32 scan over the chunks."""
    B, T, H, K = k.shape
    NC = T // L
    kw = (k.astype(jnp.float32) * jnp.swapaxes(w, 1, 2)[..., None]).reshape(B, NC, L, H, K)
    vc = v.astype(jnp.float32).reshape(B, NC, L, H, -1)

    def step(carry, xs):
        c, n = carry
        kc, vcc, d = xs
        nxt = (d[..., None, None] * c + jnp.einsum("blhk,blhv->bhkv", kc, vcc),
               d[..., None] * n + kc.sum(1))
        return nxt, (c, n)

    (c, n), (cs, ns) = jax.lax.scan(step, (c0, n0), (jnp.moveaxis(kw, 1, 0),
                                                     jnp.moveaxis(vc, 1, 0),
                                                     jnp.moveaxis(decay, 2, 0)))
    cs = jnp.concatenate([jnp.moveaxis(cs, 0, 2), c[:, :, None]], 2)
    ns = jnp.concatenate([jnp.moveaxis(ns, 0, 2), n[:, :, None]], 2)
    return cs, ns, c


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.sqrt(jnp.sum((a - b) ** 2) / (jnp.sum(b ** 2) + 1e-30)))


p = argparse.ArgumentParser()
p.add_argument("--old", default=None)
p.add_argument("--shape", default="8,8192,8,256,512")
args = p.parse_args()
B, T, H, K, V = map(int, args.shape.split(","))
x = common.mlstm_inputs(0, B, T, H, K, V, "bfloat16")
rows = []
for L in (256, 128):
    g = ref.gate_rows(x["i"], x["f"], chunk_size=L, input_gate="exp", m0=jnp.zeros((B, H)),
                      scale=K ** -0.5)
    c0, n0 = x["c0"], x["n0"]
    ins = (x["k"], x["v"], g.w_state, g.w_state, g.decay, c0, n0)
    want = reference(*ins, L)
    variants = [dict(warpgroups=1, block_k=64, block_v=256, max_steps=2),
                dict(warpgroups=2, block_k=64, block_v=256, max_steps=2),
                dict(warpgroups=2, block_k=64, block_v=128, max_steps=3)]
    fns = []
    if args.old:
        spec = importlib.util.spec_from_file_location("states_old", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        fns.append(("old 1 warpgroup bk64 bv256", jax.jit(functools.partial(
            old.state_recurrence, reverse=False, chunk_size=L)), None))
    for kw in variants:
        wk, wv = warpgroup_split(K, V, kw["block_k"], kw["block_v"], kw["warpgroups"])
        name = " ".join(f"{k}={v}" for k, v in kw.items())
        fns.append((name, jax.jit(functools.partial(state_recurrence, reverse=False,
                                                    chunk_size=L, **kw)), (wk, wv, kw)))
    for name, fn, split in fns:
        try:
            out = jax.block_until_ready(fn(*ins))
            t = common.time_jax(fn, [ins], reps=20, batch=10)
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile is a result
            rows.append(dict(L=L, variant=name, error=repr(e)[:300]))
            print(L, name, "FAILED", repr(e)[:300], flush=True)
            continue
        err = {n: rel(a, b) for n, a, b in zip(("states", "n", "last"), out, want)}
        row = dict(L=L, variant=name, ms=t["ms"], rel_err=err)
        if split is not None:
            wk, wv, kw = split
            # bytes into the CTAs: k once per V tile of a CTA, v once per K tile; states out.
            ctas_v, ctas_k = V // (wv * kw["block_v"]), K // (wk * kw["block_k"])
            gb = (B * T * H * 2 * (K * ctas_v + V * ctas_k) + B * H * (T // L + 1) * K * V * 2) / 1e9
            row.update(gb_moved=gb, tbps=gb / t["ms"])
        rows.append(row)
        print(json.dumps(row), flush=True)
res = dict(common.run_info(probe="states", shape=[B, T, H, K, V]), rows=rows)
out = os.path.join(os.environ.get("OUT", "."), "probe_states.json")
with open(out, "w") as f:
    json.dump(res, f, indent=1)
