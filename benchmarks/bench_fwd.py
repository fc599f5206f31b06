"""Forward benchmark of the TFLA Pallas kernels (issue 3 §5), one run, side by side:

  * ours: `mlstm_fwd` (both gates; chunk 64..1024 at the 7B head shape, default chunk over T),
  * the pure-JAX chunkwise path (`tfla_jax.ref.mlstm_chunkwise`, XLA, chunk 64),
  * cuDNN causal attention (`jax.nn.dot_product_attention(..., implementation="cudnn")`) at
    H=32, D=128 with the same tokens,
at T in {1K, ..., 64K} with B*T = 65,536, H=8, K=256, V=512, bf16. Reports the median forward time,
TFLOP/s, bytes moved, fraction of the roofline and peak memory (XLA's memory analysis of the
compiled program: arguments + outputs + temporaries); writes bench_fwd.json and bench_fwd.png.

    PYTHONPATH=. python3 benchmarks/bench_fwd.py [--out DIR] [--mode bench|tune] [--Ts ...]

`--mode tune` times each kernel alone over a sweep of tilings at B=8, T=8192 (what the defaults
in tfla_jax/pallas/config.py come from).

Counting (design §3; per (b, h) sequence, F_c = 1/2 causal fraction, L chunk):
  FLOP  = T [ 2 F_c L (K + V) + 4 K V ]          (useful work: no recomputation, no waste tiles)
  bytes = T (2K + 2V) s + (T/L) 8 K V + 8 T      (q, k, v, h in dtype size s; C_k f32 written once
                                                  and read once; float32 gates in, den/m out)
cuDNN: FLOP = 2 T^2 D per (b, h) (causal half of 4 T^2 D), bytes = 4 T D s.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from tfla_jax import ref
from tfla_jax.pallas import TilingConfig, mlstm_fwd
from tfla_jax.pallas import fwd as pfwd

# Ceilings measured on the lent machines (/work/.library/device/KINDS.md): bf16 dense matmul, copy.
PEAKS = {"H100": (800e12, 3.0e12), "H200": (790e12, 4.3e12)}


def device_peaks():
    kind = jax.devices()[0].device_kind
    for name, p in PEAKS.items():
        if name in kind:
            return kind, p
    return kind, PEAKS["H100"]


def bench(fn, arg_sets, reps=20, warmup=3):
    """Median wall time (s) of fn over reps calls, rotating input sets, after compile + warm-up."""
    jax.block_until_ready(fn(*arg_sets[0]))
    for r in range(warmup):
        jax.block_until_ready(fn(*arg_sets[r % len(arg_sets)]))
    ts = []
    for r in range(reps):
        a = arg_sets[r % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_memory(fn, args):
    try:
        m = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is best effort
        return None


def mlstm_counts(B, T, H, K, V, L, itemsize):
    flop = B * H * T * (L * (K + V) + 4 * K * V)
    byts = B * H * (T * (2 * K + 2 * V) * itemsize + (T // L) * 8 * K * V + 16 * T)
    return flop, byts


def attn_counts(B, T, H, D, itemsize):
    return 2 * B * H * T * T * D, 4 * B * H * T * D * itemsize


def make_mlstm_inputs(key, B, T, H, K, V, dtype=jnp.bfloat16, n_sets=2):
    sets = []
    for s in range(n_sets):
        ks = jax.random.split(jax.random.fold_in(key, s), 5)
        sets.append((jax.random.normal(ks[0], (B, T, H, K), dtype),
                     jax.random.normal(ks[1], (B, T, H, K), dtype),
                     jax.random.normal(ks[2], (B, T, H, V), dtype),
                     2.0 * jax.random.normal(ks[3], (B, T, H), jnp.float32),
                     1.5 * jax.random.normal(ks[4], (B, T, H), jnp.float32) + 3.0))
    return sets


def row(name, gate, B, T, H, L, t, flop, byts, peaks, mem, extra=None):
    pf, pb = peaks
    floor = max(flop / pf, byts / pb)
    r = dict(impl=name, gate=gate, B=B, T=T, H=H, chunk=L, ms=t * 1e3, tflops=flop / t / 1e12,
             gbytes=byts / 1e9, roofline_ms=floor * 1e3, roofline_frac=floor / t,
             bound="compute" if flop / pf >= byts / pb else "memory",
             peak_mem_gb=None if mem is None else mem / 1e9)
    if extra:
        r.update(extra)
    print(json.dumps(r), flush=True)
    return r


def ours_fn(gate, cfg, interpret=False):
    def f(q, k, v, i, fg):
        return mlstm_fwd(q, k, v, i, fg, input_gate=gate, normalize=True, config=cfg,
                         interpret=interpret)
    return f


def run_bench(args, peaks, results):
    (H, K, V), dtype = args.heads, jnp.bfloat16
    key = jax.random.PRNGKey(0)
    Ts = args.Ts
    for T in Ts:
        B = max(1, args.tokens // T)
        sets = make_mlstm_inputs(key, B, T, H, K, V, dtype)
        chunks = [None]
        if T == args.chunk_sweep_T:
            chunks += [64, 128, 256, 512, 1024]
        for gate in ("exp", "sigmoid"):
            for L in chunks:
                cfg = TilingConfig.default(K, V, T, dtype, gate, chunk_size=L)
                if args.override:
                    cfg = dataclasses.replace(cfg, **args.override)
                    cfg = cfg.with_chunk_size(L or min(cfg.chunk_size, T))
                cfg = cfg.resolve(K, V)
                name = "ours" if L is None else "ours-chunk"
                fn = jax.jit(ours_fn(gate, cfg, args.interpret))
                try:
                    t = bench(fn, sets)
                except Exception as e:  # noqa: BLE001
                    print(f"FAILED {name} {gate} T={T} L={cfg.chunk_size}: {e!s:.300}", flush=True)
                    continue
                flop, byts = mlstm_counts(B, T, H, K, V, cfg.chunk_size, 2)
                results.append(row(name, gate, B, T, H, cfg.chunk_size, t, flop, byts, peaks,
                                   peak_memory(ours_fn(gate, cfg, args.interpret), sets[0]),
                                   dict(config=dataclasses.asdict(cfg))))
        # Pure-JAX chunkwise (XLA), exp gate, chunk 64.
        fn = jax.jit(lambda q, k, v, i, f: ref.mlstm_chunkwise(q, k, v, i, f, chunk_size=64))
        try:
            t = bench(fn, sets, reps=5, warmup=1)
            flop, byts = mlstm_counts(B, T, H, K, V, 64, 2)
            results.append(row("jax-chunkwise", "exp", B, T, H, 64, t, flop, byts, peaks,
                               peak_memory(fn, sets[0])))
        except Exception as e:  # noqa: BLE001
            print(f"FAILED chunkwise T={T}: {e!s:.300}", flush=True)
        del sets
        # cuDNN causal attention at H=32, D=128, same tokens.
        Ha, D = 32, 128
        ks = jax.random.split(jax.random.fold_in(key, T), 6)
        asets = [tuple(jax.random.normal(ks[3 * s + j], (B, T, Ha, D), dtype) for j in range(3))
                 for s in range(2)]
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"))
        try:
            t = bench(fn, asets)
            flop, byts = attn_counts(B, T, Ha, D, 2)
            results.append(row("cudnn-attention", "-", B, T, Ha, None, t, flop, byts, peaks,
                               peak_memory(fn, asets[0])))
        except Exception as e:  # noqa: BLE001
            print(f"FAILED cudnn T={T}: {e!s:.300}", flush=True)
        del asets


# ----------------------------------------------------------------------------------------------
# Tuning: each kernel alone at the 7B head shape.
# ----------------------------------------------------------------------------------------------
STATES_SWEEP = [  # (states_block_k, states_block_v, states_block_kv, warps, stages)
    (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 128, 32, 4, 4), (32, 128, 64, 4, 3),
]
OUTPUT_SWEEP = [  # (block_q, block_kv, block_k, block_v, warps, stages)
    (128, 64, 64, 128, 8, 3), (128, 64, 32, 128, 8, 3), (128, 32, 64, 128, 8, 3),
    (128, 64, 256, 128, 8, 2), (64, 64, 256, 256, 8, 2), (64, 64, 64, 128, 4, 3),
]


def run_tune(args, peaks, results):
    (B, T, H, K, V), dtype = args.shape, jnp.bfloat16
    interp = dict(interpret=args.interpret)
    sets = make_mlstm_inputs(jax.random.PRNGKey(1), B, T, H, K, V, dtype)
    base = TilingConfig.default(K, V, T, dtype, "exp")
    for L in args.tune_chunks:
        for gate in args.tune_gates:
            exp_gate = gate == "exp"
            cfg0 = base.with_chunk_size(L).resolve(K, V)
            prep = jax.jit(lambda i, f: pfwd.chunk_gate_terms(i, f, L, gate))
            gts = [prep(s[3], s[4]) for s in sets]
            t_prep = bench(prep, [(s[3], s[4]) for s in sets])
            zeros = (jnp.zeros((B, H, K, V)), jnp.zeros((B, H, K)), jnp.zeros((B, H)))
            st_args = [(s[1], s[2], g[1], g[3], g[4], *zeros) for s, g in zip(sets, gts)]
            best_states = (None, 1e9)
            for sbk, sbv, sbkv, w, st in STATES_SWEEP:
                cfg = dataclasses.replace(cfg0, states_block_k=sbk, states_block_v=sbv,
                                          states_block_kv=min(sbkv, L), states_num_warps=w,
                                          states_num_stages=st).resolve(K, V)
                fn = jax.jit(lambda *a, cfg=cfg: pfwd.chunk_states(*a, config=cfg,
                                                                    exp_gate=exp_gate, **interp))
                try:
                    t = bench(fn, st_args, reps=10, warmup=2)
                except Exception as e:  # noqa: BLE001
                    print(f"FAILED states {gate} L={L} {(sbk, sbv, sbkv, w, st)}: {e!s:.200}")
                    continue
                byts = B * H * (T * (K + V) * 2 + (T // L + 1) * 4 * K * V)
                r = dict(kernel="chunk_states", gate=gate, chunk=L, tiling=[sbk, sbv, sbkv, w, st],
                         ms=t * 1e3, gbytes=byts / 1e9, gbps=byts / t / 1e9)
                print(json.dumps(r), flush=True)
                results.append(r)
                if t < best_states[1]:
                    best_states = (cfg, t)
            states = [jax.jit(lambda *a: pfwd.chunk_states(*a, config=cfg0, exp_gate=exp_gate,
                                                           **interp))(*x) for x in st_args]
            out_args = [(s[0], s[1], s[2], g[0], g[2], *st) for s, g, st in zip(sets, gts, states)]
            for bq, bkv, bk, bv, w, stg in OUTPUT_SWEEP:
                if bq > L or bkv > L:
                    continue
                cfg = dataclasses.replace(cfg0, block_q=bq, block_kv=bkv, block_k=bk, block_v=bv,
                                          num_warps=w, num_stages=stg).resolve(K, V)
                fn = jax.jit(lambda *a, cfg=cfg: pfwd.chunk_output(
                    *a, config=cfg, exp_gate=exp_gate, normalize=True, scale=K ** -0.5, eps=1e-6,
                    **interp))
                try:
                    t = bench(fn, out_args, reps=10, warmup=2)
                except Exception as e:  # noqa: BLE001
                    print(f"FAILED output {gate} L={L} {(bq, bkv, bk, bv, w, stg)}: {e!s:.200}")
                    continue
                flop = B * H * T * (L * (K + V) + 2 * K * V)
                byts = B * H * (T * (2 * K + 2 * V) * 2 + (T // L) * 4 * K * V)
                r = dict(kernel="chunk_output", gate=gate, chunk=L,
                         tiling=[bq, bkv, bk, bv, w, stg],
                         ms=t * 1e3, tflops=flop / t / 1e12, gbytes=byts / 1e9)
                print(json.dumps(r), flush=True)
                results.append(r)
            results.append(dict(kernel="gate_prep", gate=gate, chunk=L, ms=t_prep * 1e3))
            print(json.dumps(results[-1]), flush=True)
            del states, out_args, st_args, gts


def best_from_tune(results):
    """TilingConfig overrides from the fastest tuned kernels (exp gate), best chunk by total."""
    best = {}
    for r in results:
        if r.get("kernel") in ("chunk_states", "chunk_output"):
            key = (r["chunk"], r["kernel"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    totals = {L: best[(L, "chunk_states")]["ms"] + best[(L, "chunk_output")]["ms"]
              for L in {k[0] for k in best}
              if (L, "chunk_states") in best and (L, "chunk_output") in best}
    if not totals:
        return {}
    L = min(totals, key=totals.get)
    sbk, sbv, sbkv, sw, sst = best[(L, "chunk_states")]["tiling"]
    bq, bkv, bk, bv, w, st = best[(L, "chunk_output")]["tiling"]
    return dict(chunk_size=L, block_q=bq, block_kv=bkv, block_k=bk, block_v=bv, num_warps=w,
                num_stages=st, states_block_k=sbk, states_block_v=sbv, states_block_kv=sbkv,
                states_num_warps=sw, states_num_stages=sst)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in results:
        if r.get("impl") in ("ours", "jax-chunkwise", "cudnn-attention"):
            label = r["impl"] + (f" (H={r['H']}, D=128)" if r["gate"] == "-" else f" ({r['gate']})")
            series.setdefault(label, []).append((r["T"], r["ms"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (B*T = 65536)")
    ax.set_ylabel("forward time (ms)")
    ax.set_title(f"forward, bf16, mLSTM H=8 K=256 V=512; {jax.devices()[0].device_kind}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(results):
    print(f"\n{'impl':16} {'gate':7} {'B':>3} {'T':>6} {'L':>5} {'ms':>8} {'TFLOP/s':>8} "
          f"{'GB':>6} {'roof%':>6} {'bound':>7} {'memGB':>6}")
    for r in results:
        if "impl" not in r:
            continue
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        print(f"{r['impl']:16} {r['gate']:7} {r['B']:3} {r['T']:6} {str(r['chunk'] or '-'):>5} "
              f"{r['ms']:8.3f} {r['tflops']:8.1f} {r['gbytes']:6.2f} "
              f"{100 * r['roofline_frac']:6.1f} {r['bound']:>7} {mem:>6}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--mode", choices=("bench", "tune", "both"), default="bench",
                   help="both: tune, then bench with the fastest tuned tiling as the default")
    p.add_argument("--override", type=json.loads, default=None,
                   help="JSON dict of TilingConfig fields applied on top of the defaults")
    p.add_argument("--Ts", type=int, nargs="+",
                   default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--tokens", type=int, default=65536, help="B*T")
    p.add_argument("--heads", type=int, nargs=3, default=[8, 256, 512], help="H K V")
    p.add_argument("--chunk-sweep-T", type=int, default=8192)
    p.add_argument("--shape", type=int, nargs=5, default=[8, 8192, 8, 256, 512],
                   help="tune: B T H K V")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test of this script")
    p.add_argument("--tune-chunks", type=int, nargs="+", default=[256])
    p.add_argument("--tune-gates", nargs="+", default=["exp"])
    a = p.parse_args()
    kind, peaks = device_peaks()
    print(f"device: {kind}; jax {jax.__version__}; peaks {peaks[0] / 1e12:.0f} TFLOP/s, "
          f"{peaks[1] / 1e12:.1f} TB/s", flush=True)
    results = []
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)

    def dump(name, res, **extra):
        with open(os.path.join(a.out, name), "w") as fh:
            json.dump(dict(device=kind, date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
                           peaks=peaks, results=res, **extra), fh, indent=1)

    if a.mode in ("tune", "both"):
        try:
            run_tune(a, peaks, results)
        finally:
            dump("tune_fwd.json", results)
        if a.mode == "both":
            a.override = best_from_tune(results)
            print("tuned override:", json.dumps(a.override), flush=True)
    if a.mode in ("bench", "both"):
        results = []
        try:
            run_bench(a, peaks, results)
        finally:
            dump("bench_fwd.json", results, override=a.override)
            plot(results, os.path.join(a.out, "bench_fwd.png"))
            print_table(results)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
