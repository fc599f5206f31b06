"""GPU probe (2026-12-01): Mosaic keep_states gradients vs the recompute path at four shapes, and
the gate preparation inside the forward program (full forward vs the kernels on precomputed gate
vectors vs ref.gate_rows alone, per-call sync). Results: results/h200-2026-12-01c/
probe_keep_gates.json.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/probe_keep_states.py   # $OUT/probe1.json
"""
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import tfla_jax  # noqa: E402
from tfla_jax import backends, ref  # noqa: E402
from tfla_jax.backends.mosaic import MosaicConfig  # noqa: E402
OUT = os.environ.get("OUT", ".")
res = {}

def rel(a, b):
    a = jnp.asarray(a, jnp.float32); b = jnp.asarray(b, jnp.float32)
    return float(jnp.sqrt(jnp.sum((a - b) ** 2) / (jnp.sum(b ** 2) + 1e-30)))

# 1. keep_states: gradients equal to the recompute path (bf16, fp16; both gates; K!=64 multiple)
for (B, T, H, K, V, dt, gate) in [(2, 2048, 4, 256, 512, "bfloat16", "exp"),
                                  (2, 2048, 4, 256, 512, "bfloat16", "sigmoid"),
                                  (2, 1000, 4, 96, 192, "bfloat16", "exp"),
                                  (2, 2048, 4, 128, 128, "float16", "exp")]:
    x = common.mlstm_inputs(0, B, T, H, K, V, dt)
    st = tfla_jax.MLSTMState(x["c0"], x["n0"], x["m0"])
    def loss(cfg):
        def f(q, k, v, i, ff, st):
            h, s = tfla_jax.mlstm(q, k, v, i, ff, input_gate=gate, initial_state=st,
                                  return_state=True, implementation="pallas_mosaic_gpu",
                                  config=cfg)
            return (jnp.sum(h.astype(jnp.float32) * x["dh"].astype(jnp.float32))
                    + jnp.sum(s.c * x["dc"]) + jnp.sum(s.n * x["dn"]))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4, 5)))
    cfg = MosaicConfig.default(K, V, T, jnp.dtype(dt))
    g0 = loss(cfg)(x["q"], x["k"], x["v"], x["i"], x["f"], st)
    g1 = loss(dataclasses.replace(cfg, keep_states=True))(x["q"], x["k"], x["v"], x["i"], x["f"], st)
    errs = [rel(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))]
    res[f"keep {B},{T},{H},{K},{V},{dt},{gate}"] = max(errs)
    print("keep_states vs recompute", B, T, H, K, V, dt, gate, "max rel", max(errs), flush=True)

# 2. gate prep inside the forward program: full forward vs forward on precomputed gates
B, T, H, K, V = 8, 8192, 8, 256, 512
sets = [common.mlstm_inputs(s, B, T, H, K, V, "bfloat16") for s in range(2)]
be = backends.get_backend("pallas_mosaic_gpu")
for gate in ("exp", "sigmoid"):
    cfg = MosaicConfig.default(K, V, T, jnp.bfloat16)
    L = cfg.chunk_size
    def gt_of(i, f, m0):
        return ref.gate_rows(i, f, chunk_size=L, input_gate=gate, m0=m0, scale=K ** -0.5)
    def full(q, k, v, i, f, c0, n0, m0):
        h, s = tfla_jax.mlstm(q, k, v, i, f, input_gate=gate, return_state=True,
                              initial_state=tfla_jax.MLSTMState(c0, n0, m0),
                              implementation="pallas_mosaic_gpu")
        return h, s.c
    def kern(q, k, v, gt, c0, n0):
        out = be.forward(q, k, v, gt, c0, n0, config=cfg, normalize=True, eps=1e-6,
                         interpret=False, residuals=False)
        return out.h, out.c_T
    args_full = [(s["q"], s["k"], s["v"], s["i"], s["f"], s["c0"], s["n0"], s["m0"]) for s in sets]
    gts = [jax.jit(gt_of)(s["i"], s["f"], s["m0"]) for s in sets]
    args_kern = [(s["q"], s["k"], s["v"], g, s["c0"], s["n0"]) for s, g in zip(sets, gts)]
    args_gt = [(s["i"], s["f"], s["m0"]) for s in sets]
    for name, fn, a in (("full", full, args_full), ("kernels only", kern, args_kern),
                        ("gate_rows alone", gt_of, args_gt)):
        r = common.time_jax(jax.jit(fn), a, reps=40)
        res[f"{gate} {name}"] = r["ms"]
        print(gate, name, "%.3f ms (min %.3f)" % (r["ms"], r["min_ms"]), flush=True)
json.dump(res, open(os.path.join(OUT, "probe1.json"), "w"), indent=1)
