"""Peers side by side in one GPU call, each in its own subprocess (one crash spares the others).

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_peers.py --out $OUT [--shapes headline,t_sweep]

Peers (forward and forward+backward, bf16, the mLSTM shape of specs.py unless stated):
  ours:<impl>         tfla_jax.mlstm per kernel backend (bench_mlstm.bench_case: initial state,
                      gradients of q, k, v, i, f and the state), exp and sigmoid input gate;
  mlstm_kernels:exp   mlstm_kernels 2.0.6 TFLA Triton, mlstm_chunkwise__xl_chunk, chunk 128,
  mlstm_kernels:sigmoid  and mlstm_siging_chunkwise__xl_chunk (normalize=True); torch, layout
                      (B, H, T, D), gates in bf16 like mlstm_kernels' own benchmark;
  fla:simple_gla      fla-core 0.6.0 chunk_simple_gla (B, T, H, D), g = logsigmoid(f) float32,
                      default chunk 64, no input gate or normaliser;
  cudnn               jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn"),
                      H=32, D=128 at the same tokens (specs.Shape.attention).
The torch peers get an initial state and cotangents on the final state too (--no-state: none).
Timing: common.time_jax / common.time_torch (median of >= 20, rotating input sets > 2x L2); the
JAX rows time --batch calls dispatched back to back per sample (default 10), so that like the
torch rows' CUDA events they measure the GPU's time per call, not the host's dispatch and sync.
Peak memory: XLA's compiled analysis (JAX); torch.cuda.max_memory_allocated over one call minus
what was allocated before it, plus one input set (torch). Writes bench_peers.json and .png.
A peer that is not installed reports "not installed: ..."; one that dies, "crashed: <last
stderr line>".
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import specs  # noqa: E402

PEERS = ("ours", "mlstm_kernels:exp", "mlstm_kernels:sigmoid", "fla:simple_gla", "cudnn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default=",".join(PEERS),
                   help="'ours' = one process per kernel backend of --ours-impls")
    p.add_argument("--ours-impls", default="auto", help="auto: every kernel backend available")
    p.add_argument("--gates", default="exp,sigmoid", help="for ours")
    p.add_argument("--shapes", default="headline")
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--no-state", action="store_true", help="torch peers without initial state")
    p.add_argument("--interpret", action="store_true", help="ours in Pallas interpret mode (CPU)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=10,
                   help="calls per timing sample, synchronised once (common.time_jax); 1: "
                        "every call synchronised")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--peak-tbps", type=float)
    p.add_argument("--timeout", type=int, default=1200, help="seconds per peer process")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def base_row(peer, impl, gate, pas, shape, **kw):
    return dict(label=peer, impl=impl, gate=gate, **{"pass": pas}, B=shape.B, T=shape.T,
                H=shape.H, K=shape.K, V=shape.V, dtype=shape.dtype, **kw)


class Unavailable(Exception):
    """A peer that cannot run here (no CUDA device)."""


class Sink:
    """Rows of one worker, rewritten to its JSON file after every row (a crash keeps them)."""

    def __init__(self, path, info):
        self.path, self.info, self.rows = path, info, []

    def add(self, row):
        self.rows.append(row)
        common.log_row(row)
        with open(self.path, "w") as fh:
            json.dump(dict(self.info, rows=self.rows), fh, default=str)


# ----------------------------------------------------------------------------------------------
# JAX workers
# ----------------------------------------------------------------------------------------------

def list_impls(args, sink):
    api = common.Tfla(common.import_tfla())
    sink.info.update(common.run_info(), impls=api.default_impls(args.interpret)[:-1])
    sink.add(dict(label="list", impls=sink.info["impls"]))


def worker_ours(impl, args, sink):
    import bench_mlstm

    api = common.Tfla(common.import_tfla())
    sink.info.update(common.run_info(**api.info()))
    peaks = common.peaks_for(sink.info["device"], args.peak_tflops, args.peak_tbps)
    opts = argparse.Namespace(label=f"ours:{impl}", interpret=args.interpret, reps=args.reps,
                              warmup=args.warmup, batch=args.batch)
    for n, shape in enumerate(specs.shapes(args.shapes)):
        sets = bench_mlstm.input_sets(shape, 1000 * n)
        for gate in args.gates.split(","):
            for pas in args.passes.split(","):
                sink.add(bench_mlstm.bench_case(api, impl, shape, gate, None, pas, sets, opts,
                                                peaks, {}))
        del sets


def worker_cudnn(args, sink):
    import jax
    import jax.numpy as jnp

    sink.info.update(common.run_info())
    peaks = common.peaks_for(sink.info["device"], args.peak_tflops, args.peak_tbps)
    for n, shape in enumerate(specs.shapes(args.shapes)):
        B, T, H, D = shape.attention()
        dt = jnp.dtype(shape.dtype)

        def one_set(seed):
            ks = jax.random.split(jax.random.key(seed), 4)
            return tuple(jax.random.normal(kk, (B, T, H, D), jnp.float32).astype(dt) for kk in ks)

        first = one_set(100 * n)
        sets = [first] + [one_set(100 * n + j)
                          for j in range(1, common.n_sets_for(common.set_bytes(first)))]
        attn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, implementation="cudnn")
        for pas in args.passes.split(","):
            row = dict(label="cudnn", impl="cudnn-attention", gate="-", **{"pass": pas}, B=B,
                       T=T, H=H, K=D, V=D, dtype=shape.dtype)
            try:
                if pas == "fwd":
                    fn, arg_sets = jax.jit(attn), [s[:3] for s in sets]
                else:
                    loss = lambda q, k, v, do: jnp.sum(  # noqa: E731
                        attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
                    fn, arg_sets = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), sets
                t = common.time_jax(fn, arg_sets, args.reps, args.warmup, args.batch)
                flop, byts = common.attention_counts(B, T, H, D, dt.itemsize, pas == "fwdbwd")
                mem = common.compiled_peak_bytes(fn, *arg_sets[0])
                row.update(**t, **common.roofline(t["ms"], flop, byts, peaks),
                           peak_mem_gb=None if mem is None else mem / 1e9)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"[:300]
            sink.add(row)


# ----------------------------------------------------------------------------------------------
# torch workers
# ----------------------------------------------------------------------------------------------

def torch_info(sink, package):
    import importlib.metadata

    import torch

    if not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    import triton

    sink.info.update(common.run_info(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                     triton=triton.__version__,
                                     peer_version=importlib.metadata.version(package)))


def torch_sets(shape, layout, gate_dtype, with_state, m_shape):
    """Rotating torch input sets: (q, k, v, i, f, c0, n0, m0, dh, dc, dn); layout "bhtd" or
    "bthd"; the distributions of common.mlstm_inputs."""
    import torch

    B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
    dt = getattr(torch, shape.dtype)
    seq = (lambda d: (B, H, T, d)) if layout == "bhtd" else (lambda d: (B, T, H, d))
    gshape = (B, H, T) if layout == "bhtd" else (B, T, H)

    def one(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        rn = lambda *s, dtype=torch.float32: torch.randn(  # noqa: E731
            *s, generator=g, device="cuda", dtype=torch.float32).to(dtype)
        x = [rn(*seq(K), dtype=dt), rn(*seq(K), dtype=dt), rn(*seq(V), dtype=dt),
             rn(*gshape, dtype=gate_dtype), (rn(*gshape) + common.F_BIAS).to(gate_dtype)]
        if with_state:
            x += [rn(B, H, K, V) / K ** 0.5, rn(B, H, K) / K ** 0.5, rn(*m_shape)]
        else:
            x += [None, None, None]
        x += [rn(*seq(V), dtype=dt), rn(B, H, K, V), rn(B, H, K)]
        return x

    first = one(0)
    nbytes = sum(t.numel() * t.element_size() for t in first if t is not None)
    return [first] + [one(j) for j in range(1, common.n_sets_for(nbytes))], nbytes


def torch_case(sink, row, call, sets, set_nbytes, flop_byts, peaks, args, with_state):
    """Times call (inputs -> (h, c_T or None, n_T or None)) forward (no_grad) or
    forward+backward (torch.autograd.grad of sum(h dh) + sum(c_T dc) + sum(n_T dn))."""
    import torch

    pas = row["pass"]
    try:
        if pas == "fwd":
            def fn(*x):
                with torch.no_grad():
                    return call(*x[:8])
            arg_sets = sets
        else:
            arg_sets = [[t.detach().clone().requires_grad_(j < 5 or (with_state and j < 7))
                         if t is not None and j < 8 else t for j, t in enumerate(s)]
                        for s in sets]

            def fn(*x):
                h, c, n = call(*x[:8])
                loss = (h.float() * x[8].float()).sum()
                for s, ds in ((c, x[9]), (n, x[10])):
                    if s is not None:
                        loss = loss + (s * ds).sum()
                # allow_unused: a peer may ignore an input (FLA: i and n0)
                return torch.autograd.grad(loss, [t for t in x[:8] if t is not None
                                                  and t.requires_grad], allow_unused=True)
        t = common.time_torch(fn, arg_sets, args.reps, args.warmup)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*arg_sets[0])
        torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() - before + set_nbytes
        flop, byts = flop_byts(pas == "fwdbwd")
        row.update(**t, **common.roofline(t["ms"], flop, byts, peaks), peak_mem_gb=mem / 1e9)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"[:300]
    sink.add(row)


def worker_mlstm_kernels(gate, args, sink):
    import torch

    torch_info(sink, "mlstm_kernels")
    if gate == "exp":
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk as k
    else:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk_siging import (
            mlstm_siging_chunkwise__xl_chunk as k)
    peaks = common.peaks_for(sink.info["device"], args.peak_tflops, args.peak_tbps)
    L, with_state = 128, not args.no_state
    extra = dict(normalize=True) if gate == "sigmoid" else {}

    def call(q, k_, v, i, f, c0, n0, m0):
        out = k(q, k_, v, i, f, c_initial=c0, n_initial=n0,
                m_initial=m0 if gate == "exp" else None, return_last_states=True,
                chunk_size=L, autocast_kernel_dtype=torch.bfloat16, **extra)
        h, (c, n) = out[0], out[1][:2]
        return h, c, n

    for shape in specs.shapes(args.shapes):
        sets, nbytes = torch_sets(shape, "bhtd", getattr(torch, shape.dtype), with_state,
                                  (shape.B, shape.H, 1))
        for pas in args.passes.split(","):
            row = base_row(f"mlstm_kernels:{gate}", "mlstm_chunkwise__xl_chunk"
                           + ("" if gate == "exp" else "_siging"), gate, pas, shape, chunk=L)
            counts = lambda fb, s=shape: common.mlstm_counts(  # noqa: E731
                s.B, s.T, s.H, s.K, s.V, L, 2, fb)
            torch_case(sink, row, call, sets, nbytes, counts, peaks, args, with_state)
        del sets
        torch.cuda.empty_cache()


def worker_fla(args, sink):
    import torch
    import torch.nn.functional as F

    torch_info(sink, "fla-core")
    from fla.ops.simple_gla import chunk_simple_gla

    peaks = common.peaks_for(sink.info["device"], args.peak_tflops, args.peak_tbps)
    L, with_state = 64, not args.no_state

    def call(q, k, v, i, f, c0, n0, m0):
        o, ht = chunk_simple_gla(q, k, v, g=F.logsigmoid(f), initial_state=c0,
                                 output_final_state=with_state)
        return o, ht, None

    for shape in specs.shapes(args.shapes):
        sets, nbytes = torch_sets(shape, "bthd", torch.float32, with_state, (shape.B, shape.H))
        for pas in args.passes.split(","):
            row = base_row("fla:simple_gla", "chunk_simple_gla", "-", pas, shape, chunk=L)
            counts = lambda fb, s=shape: common.mlstm_counts(  # noqa: E731
                s.B, s.T, s.H, s.K, s.V, L, 2, fb)
            torch_case(sink, row, call, sets, nbytes, counts, peaks, args, with_state)
        del sets
        torch.cuda.empty_cache()


def run_worker(args):
    sink = Sink(args.worker_out, {})
    name = args.worker
    try:
        if name == "list":
            list_impls(args, sink)
        elif name.startswith("ours:"):
            worker_ours(name.split(":", 1)[1], args, sink)
        elif name == "cudnn":
            worker_cudnn(args, sink)
        elif name.startswith("mlstm_kernels:"):
            worker_mlstm_kernels(name.split(":", 1)[1], args, sink)
        elif name == "fla:simple_gla":
            worker_fla(args, sink)
        else:
            raise SystemExit(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    except ModuleNotFoundError as e:
        sink.add(dict(label=name, error=f"not installed: {e}"))
    except Unavailable as e:
        sink.add(dict(label=name, error=f"unavailable: {e}"))
    return 0


# ----------------------------------------------------------------------------------------------
# Orchestrator (imports neither JAX nor torch)
# ----------------------------------------------------------------------------------------------

def spawn(name, argv, timeout):
    """Runs one worker; returns (info, rows); a crash or timeout adds a "crashed: ..." row."""
    fd, out = tempfile.mkstemp(prefix="peer_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name,
           "--worker-out", out]
    print(f"== {name}", flush=True)
    with tempfile.TemporaryFile("w+") as err:
        try:
            rc = subprocess.run(cmd, stderr=err, timeout=timeout).returncode
            last = None
        except subprocess.TimeoutExpired:
            rc, last = -1, f"timeout after {timeout} s"
        err.seek(0)
        lines = [ln.rstrip() for ln in err.read().splitlines() if ln.strip()]
    data = json.load(open(out)) if os.path.getsize(out) else dict(rows=[])
    os.unlink(out)
    rows = data.pop("rows")
    if rc != 0:
        print("\n".join(lines[-15:]), flush=True)
        rows.append(dict(label=name, error=f"crashed: {last or (lines[-1] if lines else f'exit {rc}')}"))
    return data, rows


def plot(rows, path, title):
    """ms per peer: lines over T where several T were run, else bars; one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in ("fwd", "fwdbwd") if any(r.get("pass") == p and r.get("ms") for r in rows)]
    if not passes:
        return
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 4.5), squeeze=False)
    for ax, pas in zip(axes[0], passes):
        series = {}
        for r in rows:
            if r.get("pass") == pas and r.get("ms"):
                gate = r["gate"]
                name = r["label"] if gate == "-" or r["label"].endswith(gate) else f"{r['label']} ({gate})"
                series.setdefault(name, []).append((r["T"], r["ms"]))
        if len({t for pts in series.values() for t, _ in pts}) > 1:
            for name, pts in sorted(series.items()):
                ax.plot(*zip(*sorted(pts)), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set(yscale="log", xlabel="T (B*T constant)", ylabel="ms")
            ax.legend(fontsize=7)
        else:
            names = sorted(series)
            ax.barh(names, [series[n][0][1] for n in names])
            ax.set(xlabel="ms")
            ax.tick_params(axis="y", labelsize=7)
        ax.set_title({"fwd": "forward", "fwdbwd": "forward+backward"}[pas])
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot -> {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    peers = args.peers.split(",")
    if "ours" in peers:
        impls = args.ours_impls.split(",")
        if args.ours_impls == "auto":
            info, rows = spawn("list", argv, args.timeout)
            impls = info.get("impls", [])
            if not impls:
                print(f"no kernel backend found: {rows}", flush=True)
        i = peers.index("ours")
        peers[i:i + 1] = [f"ours:{m}" for m in impls]
    infos, rows = {}, []
    for name in peers:
        info, r = spawn(name, argv, args.timeout)
        infos[name], rows = info, rows + r
        device = next((i["device"] for i in infos.values() if i.get("device")), "unknown device")
        info = dict(common.run_info(), device=device, peers=infos, shapes=args.shapes)
        # After every peer, so that a run cut short still leaves what it measured.
        common.write_results(args.out, "bench_peers", rows, info, table=name == peers[-1])
    try:
        plot(rows, os.path.join(args.out, "bench_peers.png"),
             f"bench_peers: {args.shapes} ({', '.join(sorted({s.dtype for s in specs.shapes(args.shapes)}))});"
             f" {device}; {info['date']}")
    except ImportError as e:
        print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
