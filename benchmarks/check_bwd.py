"""GPU gradient check of the TFLA backward kernels, then the backward timings (bench_bwd.py).

    PYTHONPATH=. python3 benchmarks/check_bwd.py [--bench full,kernels,fwdbwd] [--no-small]

1. float32 (exact IEEE dots), B=1, T=1024, H=2, K=64, V=128, chunks 64 and 256, exp / sig /
   sig-nonorm: every gradient (q, k, v, i, f, c0, n0, m0) vs jax.grad of the pure-JAX chunkwise
   reference in float32 (highest matmul precision); bar 1e-4 relative RMS.
2. bf16 at real shapes, B=2, T=4096, H=8, K=256, V=512, chunks 64, 128, 256, both gates: relative
   RMS per gradient vs the float32 reference on the same (bf16-representable) inputs; bar
   max(2e-2, sensitivity), the sensitivity being how much the float32 reference's own gradient
   moves when its inputs are rounded to bf16 (d f~ sums many cancelling terms: it moves by a few
   percent, more than the kernels' own bf16 rounding does).
Cotangents are random on h and on the final state (c_T, n_T); the initial state is random.
The op is a custom_vjp: the Pallas forward (tfla_jax.pallas.fwd) + `mlstm_bwd`.
Prints one line per case and writes check_bwd.json into --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_bwd  # noqa: E402
from tfla_jax import MLSTMState, ref  # noqa: E402
from tfla_jax.pallas.bwd import BwdTilingConfig  # noqa: E402

NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def case_inputs(seed, B, T, H, K, V, dtype):
    q, k, v, i, f = bench_bwd.random_inputs(seed, B, T, H, K, V, dtype)
    ks = jax.random.split(jax.random.key(seed + 100), 6)
    c0 = jax.random.normal(ks[0], (B, H, K, V), jnp.float32) / np.sqrt(K)
    n0 = jax.random.normal(ks[1], (B, H, K), jnp.float32) / np.sqrt(K)
    m0 = jax.random.normal(ks[2], (B, H), jnp.float32)
    # Cotangents representable in the input dtype, so both sides see the same numbers.
    dh = jax.random.normal(ks[3], (B, T, H, V), jnp.float32).astype(dtype).astype(jnp.float32)
    dc = jax.random.normal(ks[4], (B, H, K, V), jnp.float32)
    dn = jax.random.normal(ks[5], (B, H, K), jnp.float32)
    return (q, k, v, i, f, c0, n0, m0), (dh, dc, dn)


def reference_grads(args, cts, gate, normalize):
    q, k, v, i, f, c0, n0, m0 = args
    up = lambda x: x.astype(jnp.float32)  # noqa: E731

    def fn(q, k, v, i, f, c0, n0, m0):
        h, st = ref.mlstm_chunkwise(q, k, v, i, f, input_gate=gate, normalize=normalize,
                                    initial_state=MLSTMState(c0, n0, m0), chunk_size=64)
        return h, st.c, st.n

    with jax.default_matmul_precision("highest"):
        g = jax.jit(lambda a, c: jax.vjp(fn, *a)[1](c))((*map(up, args[:3]), *args[3:]), cts)
    return jax.block_until_ready(g)


def kernel_grads(args, cts, gate, normalize, chunk):
    K, V = args[0].shape[-1], args[2].shape[-1]
    op = bench_bwd.make_op(gate, normalize, chunk,
                           BwdTilingConfig.get_default(chunk, K, V, args[0].dtype))
    dh, dc, dn = cts
    cts = (dh.astype(args[2].dtype), dc, dn)
    return jax.block_until_ready(jax.jit(lambda a, c: jax.vjp(op, *a)[1](c))(args, cts))


SENSITIVITY = True


def run_case(label, seed, B, T, H, K, V, dtype, gate, normalize, chunks, tol, results):
    """Kernel gradients vs the float32 reference on the same inputs. For bf16 inputs the bar is
    max(tol, sensitivity): the reference's own change when its inputs are rounded to bf16."""
    args, cts = case_inputs(seed, B, T, H, K, V, dtype)
    sensitivity = {n: 0.0 for n in NAMES}
    try:
        want = reference_grads(args, cts, gate, normalize)
        if dtype != jnp.float32 and SENSITIVITY:
            exact, _ = case_inputs(seed, B, T, H, K, V, jnp.float32)
            g_exact = reference_grads(exact, cts, gate, normalize)
            sensitivity = {n: rel_err(a, b) for n, a, b in zip(NAMES, want, g_exact)}
            del g_exact
            print(f"{label + ' (reference sensitivity to bf16 inputs)':34s}      "
                  + " ".join(f"d{n}={e:.1e}" for n, e in sensitivity.items()), flush=True)
            results[f"{label}-sensitivity"] = sensitivity
    except Exception as e:
        print(f"{label}: reference FAILED {e!r}"[:600], flush=True)
        results[label] = dict(error=repr(e)[:500])
        return False
    ok = True
    for L in chunks:
        name = f"{label}-L{L}"
        try:
            t0 = time.perf_counter()
            forward = "pallas"
            try:
                got = kernel_grads(args, cts, gate, normalize, L)
            except Exception as e:
                if os.environ.get("BWD_FORWARD") == "reference":
                    raise
                print(f"{name}: FAILED with the Pallas forward ({e!r:.300}); again with the "
                      "plain-jnp forward", flush=True)
                os.environ["BWD_FORWARD"] = forward = "reference"
                try:
                    got = kernel_grads(args, cts, gate, normalize, L)
                finally:
                    del os.environ["BWD_FORWARD"]
            errs = {}
            for n, a, b in zip(NAMES, got, want):
                if n == "m0" and gate != "exp":
                    errs[n] = 0.0 if bool(jnp.all(a == 0)) else float("inf")
                    continue
                errs[n] = rel_err(a, b) if np.all(np.isfinite(np.asarray(a, np.float32))) \
                    else float("inf")
            passed = all(e <= max(tol, sensitivity[n]) for n, e in errs.items())
            ok &= passed
            results[name] = dict(errors=errs, passed=passed, tol=tol, forward=forward,
                                 seconds=time.perf_counter() - t0)
            print(f"{name:34s} {'PASS' if passed else 'FAIL'} "
                  + " ".join(f"d{n}={e:.1e}" for n, e in errs.items()), flush=True)
        except Exception as e:
            ok = False
            results[name] = dict(error=repr(e)[:500])
            print(f"{name}: FAILED {e!r}"[:800], flush=True)
            traceback.print_exc()
    return ok


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bench", default="full,kernels,fwdbwd")
    p.add_argument("--bench-chunks", default="64,128,256")
    p.add_argument("--no-small", action="store_true")
    p.add_argument("--no-large", action="store_true")
    p.add_argument("--no-sensitivity", action="store_true")
    p.add_argument("--small-chunks", default="64,256")
    p.add_argument("--large-chunks", default="64,128,256")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    global SENSITIVITY
    SENSITIVITY = not a.no_sensitivity
    small_chunks = tuple(int(c) for c in a.small_chunks.split(","))
    large_chunks = tuple(int(c) for c in a.large_chunks.split(","))
    os.makedirs(a.out, exist_ok=True)
    print(f"device: {bench_bwd.device_name()}  jax {jax.__version__}", flush=True)
    results, ok = {}, True
    gates = [("exp", True), ("sigmoid", True), ("sigmoid", False)]
    if not a.no_small:
        for n, (gate, norm) in enumerate(gates):
            label = f"f32-{gate}{'' if norm else '-nonorm'}"
            shape = (1, 256, 1, 32, 16) if bench_bwd.INTERPRET else (1, 1024, 2, 64, 128)
            ok &= run_case(label, 10 + n, *shape, jnp.float32, gate, norm,
                           small_chunks if not bench_bwd.INTERPRET else (64,), 1e-4, results)
    if not a.no_large:
        for n, (gate, norm) in enumerate(gates[:2]):
            label = f"bf16-{gate}"
            shape = (1, 256, 1, 32, 64) if bench_bwd.INTERPRET else (2, 4096, 8, 256, 512)
            ok &= run_case(label, 20 + n, *shape, jnp.bfloat16, gate, norm,
                           (64,) if bench_bwd.INTERPRET else large_chunks, 2e-2, results)
    with open(os.path.join(a.out, "check_bwd.json"), "w") as fh:
        json.dump(dict(device=bench_bwd.device_name(), passed=ok, cases=results), fh, indent=1)
    print(f"gradient check: {'PASSED' if ok else 'FAILED'}", flush=True)
    if a.bench:
        bench_bwd.main(["--sections", a.bench, "--chunks", a.bench_chunks, "--out", a.out])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
