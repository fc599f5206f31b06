"""Several GPUs of one host: data-parallel / FSDP training scaling and context parallelism.

    # 1. examples/train_lm.py per device count and mode, the same global batch everywhere
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_scaling.py train --out $OUT
        [--presets medium] [--devices 1,2,4,8] [--modes dp,fsdp] [--global-batch 64]
        [--micro-batch 16] [--seq-len 2048] [--steps 30]
    # 2. one sequence split over the devices (context_axis), B=1 H=8 K=256 V=512 bf16
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_scaling.py context --out $OUT
        [--devices 1,2,4,8] [--tokens 65536,131072,262144,524288,1048576] [--passes fwd,fwdbwd]
    # 3. training at a sequence length one GPU cannot hold
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_scaling.py long-train --out $OUT
        [--devices 8] [--seq-len 131072] [--preset medium] [--steps 10]
    # CPU smoke of all three (tiny shapes, simulated devices)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. python3 \
        benchmarks/bench_scaling.py {train,context,long-train} --smoke --out /tmp/s

train: every (preset, mode, device count) runs in its own process (fresh allocator statistics):
tokens/s in total and per device over the steps after the first 5 (compilation), scaling
efficiency = (tokens/s per device) / (that of 1 device), peak memory per device, and the loss of
every step (the trajectories must agree across device counts to bf16 rounding: same global
batch, same data order, --grad-accum making up the difference). context: forward and
forward+backward time per token against one device's at 64K, peak memory per device, the largest
relative difference of h (and of the gradients) against the one-device call where that fits, and
the time of the collectives alone (the summaries' all-gather and the final state's all-reduce,
timed as a separate program on the same bytes). Table + JSON per mode, device and date.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_COLUMNS = [("preset", "preset", "{}"), ("mode", "mode", "{}"), ("devices", "GPUs", "{}"),
                 ("tokens_per_s", "tokens/s", "{:,.0f}"),
                 ("tokens_per_s_per_device", "per GPU", "{:,.0f}"),
                 ("efficiency", "efficiency", "{:.1%}"), ("peak_mem_gb", "mem/GPU GB", "{:.2f}"),
                 ("loss_max_diff", "max |loss - 1 GPU|", "{:.2e}"), ("error", "error", "{:.90}")]
CONTEXT_COLUMNS = [("pass", "pass", "{}"), ("devices", "GPUs", "{}"), ("T", "T", "{}"),
                   ("ms", "ms", "{:.2f}"), ("us_per_ktoken", "us / 1K tokens", "{:.2f}"),
                   ("vs_1gpu_64k", "vs 1 GPU @64K", "{:.2f}"),
                   ("collective_ms", "collectives ms", "{:.3f}"),
                   ("peak_mem_gb", "mem/GPU GB", "{:.2f}"), ("err_vs_1gpu", "err vs 1 GPU", "{:.1e}"),
                   ("error", "error", "{:.90}")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("train", "context", "long-train"))
    p.add_argument("--devices", default=None, help="device counts (default: 1,2,4,.. all)")
    p.add_argument("--presets", default="medium")
    p.add_argument("--modes", default="dp,fsdp")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per device per pass")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens", default="65536,131072,262144,524288,1048576")
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU run")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def device_counts(spec):
    import jax
    n = len(jax.devices())
    if spec:
        return [int(x) for x in spec.split(",") if int(x) <= n]
    return [d for d in (1, 2, 4, 8, 16) if d <= n]


def peak_memory_gb(n):
    import jax
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()[:n]]
    return None if None in peaks else max(peaks) / 1e9


def run_worker(kind, cfg, timeout):
    """Runs one case in a fresh process; returns its JSON result (or an error row)."""
    cmd = [sys.executable, os.path.abspath(__file__), kind, "--worker", json.dumps(cfg)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
        return dict(error=f"exit {out.returncode}: {tail[0][:250]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------
# 1. training: data parallel and FSDP
# ----------------------------------------------------------------------------------------------

def train_argv(cfg):
    n, micro = cfg["devices"], cfg["micro_batch"]
    accum = max(1, cfg["global_batch"] // (n * micro))
    argv = ["--preset", cfg["preset"], "--seq-len", str(cfg["seq_len"]),
            "--batch-size", str(cfg["global_batch"]), "--grad-accum", str(accum),
            "--steps", str(cfg["steps"]), "--warmup-steps", "5", "--log-every", "1",
            "--eval-every", str(10 ** 6), "--ckpt-every", str(10 ** 6), "--sample-tokens", "0",
            "--devices", str(n), "--fsdp", str(n if cfg["mode"] == "fsdp" else 1),
            "--context-parallel", str(cfg.get("context_parallel", 1)),
            "--out-dir", cfg["out_dir"], "--overwrite", "--no-progress"]
    return argv + (["--remat"] if cfg.get("remat") else [])


def train_worker(cfg):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_lm

    summary = train_lm.main(train_argv(cfg))
    train = summary["train"]
    steady = [r["tokens_per_s"] for r in train if r["step"] > 5]
    return dict(losses=[r["loss"] for r in train], steps=[r["step"] for r in train],
                tokens_per_s=(sum(steady) / len(steady)) if steady else None,
                peak_mem_gb=peak_memory_gb(cfg["devices"]), wall_s=summary["wall_s"])


def bench_train(args, info):
    counts = device_counts(args.devices)
    seq_len = args.seq_len or (64 if args.smoke else 2048)
    presets = ["tiny"] if args.smoke else args.presets.split(",")
    gb, micro = (8, 2) if args.smoke else (args.global_batch, args.micro_batch)
    steps = 8 if args.smoke else args.steps
    rows = []
    for preset in presets:
        for mode in args.modes.split(","):
            for n in counts:
                if mode == "fsdp" and n == 1 and "dp" in args.modes:
                    continue   # the same run as dp on one device
                cfg = dict(preset=preset, mode=mode, devices=n, global_batch=gb,
                           micro_batch=min(micro, gb // n), seq_len=seq_len, steps=steps,
                           out_dir=os.path.join("/tmp", f"scaling_{preset}_{mode}_{n}"))
                r = run_worker("train", cfg, args.timeout)
                row = dict(preset=preset, mode=mode, devices=n, seq_len=seq_len,
                           global_batch=gb, **r)
                if r.get("tokens_per_s"):
                    row["tokens_per_s_per_device"] = r["tokens_per_s"] / n
                ref = next((x for x in rows + [row] if x["preset"] == preset
                            and x["devices"] == 1 and x.get("losses")), None)   # one device
                if ref and row.get("tokens_per_s_per_device") and ref.get("tokens_per_s"):
                    row["efficiency"] = row["tokens_per_s_per_device"] / ref["tokens_per_s"]
                if ref and row.get("losses"):
                    row["loss_max_diff"] = max(abs(a - b) for a, b in
                                               zip(row["losses"], ref["losses"]))
                rows.append(row)
                common.log_row({k: v for k, v in row.items() if k != "losses"})
                common.write_results(args.out, "bench_scaling_train", rows, info, TRAIN_COLUMNS,
                                     table=False)
    common.write_results(args.out, "bench_scaling_train", rows, info, TRAIN_COLUMNS)


# ----------------------------------------------------------------------------------------------
# 2. context parallelism: one long sequence
# ----------------------------------------------------------------------------------------------

def context_worker(cfg):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import tfla_jax

    n, T, smoke = cfg["devices"], cfg["T"], cfg["smoke"]
    H, K, V, dtype = (2, 32, 32, "float32") if smoke else (8, 256, 512, "bfloat16")
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("ctx",))
    seq = NamedSharding(mesh, P(None, "ctx"))
    x = common.mlstm_inputs(0, 1, T, H, K, V, dtype, state=True, cotangents=True)
    names = ("q", "k", "v", "i", "f")
    opts = dict(return_state=True, interpret=True) if smoke else dict(return_state=True)
    if smoke:
        opts["implementation"] = "pallas_triton"

    def cell(q, k, v, i, f, c0, n0, m0, axis="ctx" if n > 1 else None):
        return tfla_jax.mlstm(q, k, v, i, f, initial_state=tfla_jax.MLSTMState(c0, n0, m0),
                              context_axis=axis, **opts)

    spec = P(None, "ctx")
    sharded = jax.shard_map(cell, mesh=mesh, in_specs=(spec,) * 5 + (P(),) * 3,
                            out_specs=(spec, P()), check_vma=not smoke)

    def forward(*a):
        h, s = sharded(*a)
        return h, s.c, s.n

    def loss(*a):
        h, c, n_ = forward(*a[:8])
        dh, dc, dn = a[8:]
        return (jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32)) + jnp.sum(c * dc)
                + jnp.sum(n_ * dn))

    args = [jax.device_put(x[k], seq) for k in names] + [x[k] for k in ("c0", "n0", "m0")]
    cots = [jax.device_put(x["dh"], seq), x["dc"], x["dn"]]
    fn = (jax.jit(forward) if cfg["pass"] == "fwd"
          else jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8)))))
    call_args = args if cfg["pass"] == "fwd" else args + cots
    t = common.time_jax(fn, [tuple(call_args)], cfg["reps"], 2)
    out = dict(**t, peak_mem_gb=peak_memory_gb(n))
    if n > 1:
        # the collectives alone: the summaries' all-gather, the final state's all-reduce
        S = jnp.zeros((n, H, K * V + K + 5), jnp.float32)

        def comm(s):
            every = jax.lax.all_gather(s, "ctx")
            return jnp.sum(every, 0), jax.lax.psum(s[:, :K * V], "ctx")

        coll = jax.jit(jax.shard_map(comm, mesh=mesh, in_specs=P("ctx"),
                                     out_specs=(P("ctx"), P("ctx"))))
        out["collective_ms"] = common.time_jax(coll, [(S,)], cfg["reps"], 2)["ms"]
    if cfg.get("check") and n > 1:   # h (forward) or dq (fwdbwd) against the one-device call
        one = jax.devices()[0]
        local = [jax.device_put(a, one) for a in call_args]
        if cfg["pass"] == "fwd":
            got = fn(*call_args)[0]
            want = jax.jit(lambda *a: cell(*a, axis=None)[0])(*local[:8])
        else:
            got = fn(*call_args)[1][0]

            def loss1(*a):
                h, s = cell(*a[:8], axis=None)
                dh, dc, dn = a[8:]
                return (jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32))
                        + jnp.sum(s.c * dc) + jnp.sum(s.n * dn))
            want = jax.jit(jax.grad(loss1))(*local)
        got, want = (jnp.asarray(jax.device_put(a, one), jnp.float32) for a in (got, want))
        out["err_vs_1gpu"] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    return out


def bench_context(args, info):
    counts = device_counts(args.devices)
    tokens = [512, 1024] if args.smoke else [int(x) for x in args.tokens.split(",")]
    rows, base = [], {}
    for pas in args.passes.split(","):
        for n in counts:
            for T in tokens:
                if T % n:
                    continue
                cfg = dict(devices=n, T=T, smoke=args.smoke, reps=args.reps, check=True,
                           **{"pass": pas})
                r = run_worker("context", cfg, args.timeout)
                row = dict(devices=n, T=T, **{"pass": pas}, **r)
                if r.get("ms"):
                    row["us_per_ktoken"] = r["ms"] * 1e6 / T
                    if n == 1 and T == tokens[0]:
                        base[pas] = row["us_per_ktoken"]
                    if pas in base:
                        row["vs_1gpu_64k"] = row["us_per_ktoken"] / base[pas]
                rows.append(row)
                common.log_row(row)
                common.write_results(args.out, "bench_scaling_context", rows, info,
                                     CONTEXT_COLUMNS, table=False)
    common.write_results(args.out, "bench_scaling_context", rows, info, CONTEXT_COLUMNS)


# ----------------------------------------------------------------------------------------------
# 3. training at a sequence length one GPU cannot hold
# ----------------------------------------------------------------------------------------------

def bench_long_train(args, info):
    n = device_counts(args.devices)[-1]
    seq_len = args.seq_len or (256 if args.smoke else 131072)
    preset = "tiny" if args.smoke else args.presets.split(",")[0]
    rows = []
    for cp in ([1, n] if n > 1 else [1]):
        cfg = dict(preset=preset, mode="dp", devices=cp, global_batch=1, micro_batch=1,
                   seq_len=seq_len, steps=6 if args.smoke else args.steps, context_parallel=cp,
                   remat=True, out_dir=os.path.join("/tmp", f"scaling_long_{cp}"))
        r = run_worker("train", cfg, args.timeout)
        row = dict(preset=preset, mode=f"context x{cp}", devices=cp, seq_len=seq_len, **r)
        if r.get("tokens_per_s"):
            row["tokens_per_s_per_device"] = r["tokens_per_s"] / cp
        if rows and rows[0].get("losses") and row.get("losses"):   # where one device held it
            row["loss_max_diff"] = max(abs(a - b) for a, b in zip(row["losses"],
                                                                  rows[0]["losses"]))
        rows.append(row)
        common.log_row({k: v for k, v in row.items() if k != "losses"})
    common.write_results(args.out, "bench_scaling_long_train", rows, info, TRAIN_COLUMNS)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        result = (train_worker if args.what == "train" else context_worker)(cfg)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import jax
    info = common.run_info(devices=len(jax.devices()), what=args.what)
    {"train": bench_train, "context": bench_context, "long-train": bench_long_train}[
        args.what](args, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
