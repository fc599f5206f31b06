"""GPU correctness check of the TFLA forward kernels on real shapes (issue 3 §5).

Kernel vs the pure-JAX chunkwise reference in float32 (inputs upcast, XLA dots at HIGHEST
precision), relative RMS error of h and of the final state, on fresh random inputs per case.
Default: B=2, T=4096, H=8, K=256, V=512, bf16, chunk 64..512, both gates, with an initial state;
plus fp32 / fp16 cases and extreme gates (finite outputs).

    PYTHONPATH=. python3 benchmarks/check_fwd.py [--out DIR]

Exit status 1 if any case fails. Writes check_fwd.json under --out (default $OUT or .).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from tfla_jax import ref
from tfla_jax.pallas import mlstm_pallas
from tfla_jax.state import MLSTMState

# Bounds on the relative RMS error (see tests/test_pallas_fwd.py for where the error comes from).
BOUNDS = {"bfloat16": (2e-2, 1e-2), "float16": (1e-2, 5e-3), "float32": (1e-4, 1e-4)}


def rel_err(x, y):
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    return float(jnp.linalg.norm(x - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30))


def make_inputs(key, B, T, H, K, V, dtype, *, extreme=False):
    ks = jax.random.split(key, 8)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32).astype(dtype)
    if extreme:
        f = jax.random.uniform(ks[3], (B, T, H), minval=-30.0, maxval=30.0)
        i = jax.random.uniform(ks[4], (B, T, H), minval=-30.0, maxval=30.0)
        i = jnp.where(jax.random.bernoulli(ks[5], 0.3, i.shape), -1e4, i)
    else:
        i = 2.0 * jax.random.normal(ks[3], (B, T, H))
        f = 1.5 * jax.random.normal(ks[4], (B, T, H)) + 3.0
    state = MLSTMState(jax.random.normal(ks[5], (B, H, K, V)),
                       jax.random.normal(ks[6], (B, H, K)),
                       jax.random.normal(ks[7], (B, H)))
    return (q, k, v, i, f), state


def check_case(key, B, T, H, K, V, dtype, gate, chunk_size, *, extreme=False, config=None):
    dtype = jnp.dtype(dtype)
    args, state = make_inputs(key, B, T, H, K, V, dtype, extreme=extreme)
    t0 = time.perf_counter()
    h, st = mlstm_pallas(*args, input_gate=gate, initial_state=state,
                         chunk_size=None if config else chunk_size, config=config)
    jax.block_until_ready((h, st))
    t_kernel = time.perf_counter() - t0
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32) for x in args]
        h_ref, st_ref = ref.mlstm_chunkwise(*up, input_gate=gate, initial_state=state,
                                            chunk_size=64)
    finite = bool(jnp.all(jnp.isfinite(h.astype(jnp.float32)))
                  and all(bool(jnp.all(jnp.isfinite(x))) for x in st))
    res = dict(B=B, T=T, H=H, K=K, V=V, dtype=dtype.name, gate=gate, chunk_size=chunk_size,
               extreme=extreme, finite=finite, compile_and_run_s=round(t_kernel, 2),
               err_h=rel_err(h, h_ref), err_c=rel_err(st.c, st_ref.c),
               err_n=rel_err(st.n, st_ref.n),
               err_m=float(jnp.max(jnp.abs(st.m - st_ref.m))))
    bh, bs = BOUNDS[dtype.name]
    if extreme:
        # Far-out gates make h ill-conditioned (a few terms dominate den, which can cancel):
        # measure how far the reference itself moves under input noise of the dtype's rounding
        # size and allow twice that.
        eps_in = float(jnp.finfo(dtype).eps)
        ks = jax.random.split(jax.random.fold_in(key, 1), 3)
        with jax.default_matmul_precision("highest"):
            noisy = [x * (1 + eps_in * jax.random.normal(kk, x.shape)) for x, kk in zip(up[:3], ks)]
            h_noisy, _ = ref.mlstm_chunkwise(*noisy, *up[3:], input_gate=gate,
                                             initial_state=state, chunk_size=64)
        res["cond_h"] = rel_err(h_noisy, h_ref)
        bh = max(bh, 2 * res["cond_h"])
    res["ok"] = bool(finite and res["err_h"] <= bh and res["err_c"] <= bs and res["err_n"] <= bs
                     and res["err_m"] <= 1e-3 * max(1.0, float(jnp.max(jnp.abs(st_ref.m)))))
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="fewer cases (chunk 64 and 256 only)")
    a = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    chunks = (64, 256) if a.quick else (64, 128, 256, 512)
    cases = [dict(B=2, T=4096, H=8, K=256, V=512, dtype="bfloat16", gate=g, chunk_size=L)
             for g in ("exp", "sigmoid") for L in chunks]
    cases += [
        dict(B=2, T=1000, H=4, K=128, V=128, dtype="float32", gate="exp", chunk_size=128),
        dict(B=2, T=1000, H=4, K=96, V=192, dtype="float16", gate="sigmoid", chunk_size=64),
        dict(B=1, T=2048, H=4, K=256, V=512, dtype="bfloat16", gate="exp", chunk_size=1024),
        dict(B=1, T=1024, H=4, K=256, V=512, dtype="float16", gate="exp", chunk_size=256),
        dict(B=1, T=1024, H=2, K=256, V=512, dtype="float32", gate="sigmoid", chunk_size=256),
        dict(B=2, T=2048, H=4, K=256, V=512, dtype="bfloat16", gate="exp", chunk_size=256,
             extreme=True),
        dict(B=2, T=2048, H=4, K=256, V=512, dtype="bfloat16", gate="sigmoid", chunk_size=256,
             extreme=True),
    ]
    results = []
    key = jax.random.PRNGKey(int(time.time()))
    for c in cases:
        key, sub = jax.random.split(key)
        try:
            r = check_case(sub, **c)
        except Exception as e:  # report and go on: one bad config must not hide the others
            r = dict(c, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
        results.append(r)
        print(json.dumps(r), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_fwd.json"), "w") as fh:
        json.dump(dict(device=dev.device_kind, date=time.strftime("%Y-%m-%d"),
                       results=results), fh, indent=1)
    print(f"\n{'gate':8} {'dtype':9} {'L':>5} {'err_h':>9} {'err_c':>9} {'err_n':>9} {'ok':>4}")
    for r in results:
        nan = float("nan")
        print(f"{r['gate']:8} {r['dtype']:9} {r['chunk_size']:5} {r.get('err_h', nan):9.2e} "
              f"{r.get('err_c', nan):9.2e} {r.get('err_n', nan):9.2e} "
              f"{'yes' if r['ok'] else 'NO':>4}" + ("  extreme" if r.get("extreme") else ""))
    n_bad = sum(not r["ok"] for r in results)
    print(f"check_fwd: {len(results) - n_bad}/{len(results)} passed on {dev.device_kind}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
