"""Training-path check and benchmark through the public API (`tfla_jax.mlstm`, custom_vjp).

1. check: gradients of every input (q, k, v, i, f, c0, n0, m0) of `tfla_jax.mlstm` on the GPU
   (implementation=None -> Pallas, bf16) against jax.grad of the pure-JAX chunkwise form in float32
   on the same (bf16-valued) inputs, random cotangents on h and the final state; relative RMS.
2. bench: forward+backward (jax.value_and_grad) median time and compiled peak memory, side by side:
   ours (both gates, default chunk; chunk sweep at T=8192), the pure-JAX chunkwise path, and cuDNN
   causal attention (H=32, D=128, same tokens), T = 1K..64K with B*T = 65,536, H=8 K=256 V=512.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_fwdbwd.py --out $OUT
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fwd import attn_counts, bench, device_peaks, make_mlstm_inputs, mlstm_counts, peak_memory  # noqa: E402

import tfla_jax  # noqa: E402
from tfla_jax import MLSTMState, ref  # noqa: E402
from tfla_jax.pallas import TilingConfig  # noqa: E402

NAMES = ["q", "k", "v", "i", "f", "c0", "n0", "m0"]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def loss_fn(op, gate):
    def loss(args, cot):
        h, s = op(*args[:5], initial_state=MLSTMState(*args[5:]), return_state=True,
                  input_gate=gate)
        return (jnp.sum(h.astype(jnp.float32) * cot[0]) + jnp.sum(s.c * cot[1])
                + jnp.sum(s.n * cot[2]))
    return loss


def check(B=2, T=4096, H=8, K=256, V=512, chunks=(None, 128)):
    results = []
    for gate in ("exp", "sigmoid"):
        ks = jax.random.split(jax.random.key(1), 12)
        q, k = (jax.random.normal(ks[j], (B, T, H, K), jnp.bfloat16) for j in (0, 1))
        v = jax.random.normal(ks[2], (B, T, H, V), jnp.bfloat16)
        i = jax.random.normal(ks[3], (B, T, H))
        f = jax.random.normal(ks[4], (B, T, H)) + 3.0
        c0 = jax.random.normal(ks[5], (B, H, K, V)) / 16
        n0 = jax.random.normal(ks[6], (B, H, K)) / 16
        m0 = jax.random.normal(ks[7], (B, H))
        cot = (jax.random.normal(ks[8], (B, T, H, V)), jax.random.normal(ks[9], (B, H, K, V)),
               jax.random.normal(ks[10], (B, H, K)))
        args = (q, k, v, i, f, c0, n0, m0)
        up = tuple(x.astype(jnp.float32) for x in args)
        chunkwise = lambda *a, **kw: ref.mlstm_chunkwise(*a, chunk_size=64, **kw)
        g_ref = jax.jit(jax.grad(loss_fn(lambda *a, return_state, **kw: chunkwise(*a, **kw),
                                         gate)))(up, cot)
        for L in chunks:
            op = lambda *a, **kw: tfla_jax.mlstm(*a, chunk_size=L, **kw)
            g = jax.jit(jax.grad(loss_fn(op, gate)))(args, cot)
            errs = {n: rel(a, b) for n, a, b in zip(NAMES, g, g_ref) if not (n == "m0" and gate != "exp")}
            finite = all(bool(jnp.all(jnp.isfinite(x))) for x in g)
            ok = finite and max(errs.values()) < 2e-2
            r = dict(gate=gate, chunk=L or "default", B=B, T=T, H=H, K=K, V=V, finite=finite,
                     ok=ok, **{f"err_d{n}": e for n, e in errs.items()})
            print(json.dumps(r), flush=True)
            results.append(r)
    return results


def fwdbwd(op):
    """value_and_grad wrt q, k, v, i, f of sum(h * w) (w fixed, non-trivial cotangent)."""
    def loss(q, k, v, i, f, w):
        return jnp.sum(op(q, k, v, i, f).astype(jnp.float32) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def bench_all(Ts, tokens, peaks, chunk_sweep=(64, 128, 512)):
    H, K, V = 8, 256, 512
    rows = []

    def add(name, gate, B, T, Hh, L, fn, sets, flop, byts):
        try:
            t = bench(fn, sets, reps=10, warmup=2)
            mem = peak_memory(fn, sets[0])
        except Exception as e:  # noqa: BLE001 - report the failure in the table
            print(f"FAILED {name} {gate} T={T}: {e!r}"[:400], flush=True)
            return
        pf, pb = peaks
        floor = max(flop / pf, byts / pb)
        r = dict(impl=name, gate=gate, B=B, T=T, H=Hh, chunk=L, ms=t * 1e3, tflops=flop / t / 1e12,
                 roofline_ms=floor * 1e3, roofline_frac=floor / t,
                 peak_mem_gb=None if mem is None else mem / 1e9)
        print(json.dumps(r), flush=True)
        rows.append(r)

    for T in Ts:
        B = tokens // T
        sets = [s + (jax.random.normal(jax.random.key(9), (B, T, H, V)),)
                for s in make_mlstm_inputs(jax.random.key(T), B, T, H, K, V)]
        chunks = [None] + (list(chunk_sweep) if T == 8192 else [])
        for gate in ("exp", "sigmoid"):
            for L in chunks:
                cfg = TilingConfig.default(K, V, T, jnp.bfloat16, gate, chunk_size=L)
                op = lambda *a, gate=gate, L=L: tfla_jax.mlstm(*a, input_gate=gate, chunk_size=L)[0]
                flop, byts = mlstm_counts(B, T, H, K, V, cfg.chunk_size, 2)
                # backward: ~2x the forward's matmul FLOPs and ~2x its bytes (recomputed states).
                add("ours" if L is None else "ours-chunk", gate, B, T, H, cfg.chunk_size,
                    fwdbwd(op), sets, 3 * flop, 3 * byts)
        op = lambda *a: tfla_jax.mlstm(*a, implementation="chunkwise", chunk_size=64)[0]
        flop, byts = mlstm_counts(B, T, H, K, V, 64, 2)
        add("jax-chunkwise", "exp", B, T, H, 64, fwdbwd(op), sets[:1] * 2, 3 * flop, 3 * byts)
        D, Ha = 128, 32
        ka = jax.random.split(jax.random.key(T + 1), 4)
        aset = [(jax.random.normal(ka[0], (B, T, Ha, D), jnp.bfloat16),
                 jax.random.normal(ka[1], (B, T, Ha, D), jnp.bfloat16),
                 jax.random.normal(ka[2], (B, T, Ha, D), jnp.bfloat16),
                 jax.random.normal(ka[3], (B, T, Ha, D)))]
        attn = lambda q, k, v, w: jnp.sum(jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32) * w)
        fn = jax.jit(jax.value_and_grad(attn, argnums=(0, 1, 2)))
        flop, byts = attn_counts(B, T, Ha, D, 2)
        # causal: half the FLOPs; backward 2.5x forward (FlashAttention-2 convention).
        add("cudnn-attention", "-", B, T, Ha, None, fn, aset * 2, 3.5 * flop / 2, 3 * byts)
    return rows


def table(rows):
    print(f"\n{'impl':<16}{'gate':<9}{'B':>3}{'T':>7}{'H':>4}{'L':>6}{'ms':>9}{'TFLOP/s':>9}"
          f"{'roofl%':>8}{'memGB':>7}")
    for r in rows:
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        print(f"{r['impl']:<16}{r['gate']:<9}{r['B']:>3}{r['T']:>7}{r['H']:>4}{str(r['chunk']):>6}"
              f"{r['ms']:>9.2f}{r['tflops']:>9.1f}{100 * r['roofline_frac']:>8.1f}{mem:>7}")


def plot(rows, path, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, gate, style in (("ours", "exp", "o-"), ("ours", "sigmoid", "s-"),
                              ("jax-chunkwise", "exp", "^--"), ("cudnn-attention", "-", "x:")):
        pts = sorted((r["T"], r["ms"]) for r in rows if r["impl"] == impl and r["gate"] == gate)
        if pts:
            label = f"{impl} ({gate})" if gate != "-" else "cuDNN attention (H=32, D=128)"
            ax.plot(*zip(*pts), style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="T (B*T = 65,536 tokens)", ylabel="forward+backward ms",
           title=f"mLSTM H=8 K=256 V=512 bf16, {device}")
    ax.set_xticks([1024, 2048, 4096, 8192, 16384, 32768, 65536],
                  ["1K", "2K", "4K", "8K", "16K", "32K", "64K"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--Ts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--replot", help="only redraw the plot and table from a bench_fwdbwd JSON file")
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as fh:
            out = json.load(fh)
        plot(out["bench"], args.replot.replace(".json", ".png"), out["device"])
        table(out["bench"])
        return
    kind, peaks = device_peaks()
    print(f"device: {kind}; jax {jax.__version__}", flush=True)
    out = dict(device=kind, jax=jax.__version__)
    if not args.skip_check:
        out["check"] = check()
    if args.check_only:
        ok = all(r["ok"] for r in out["check"])
        print("check:", "PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)
    out["bench"] = bench_all(args.Ts, args.tokens, peaks)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_fwdbwd.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    plot(out["bench"], os.path.join(args.out, "bench_fwdbwd.png"), kind)
    if "check" in out:
        print("check:", "PASS" if all(r["ok"] for r in out["check"]) else "FAIL")
    table(out["bench"])


if __name__ == "__main__":
    main()
