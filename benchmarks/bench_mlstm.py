"""mLSTM forward and forward+backward through the public `tfla_jax.mlstm`, per implementation.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_mlstm.py --out $OUT
        [--impls pallas_triton,chunkwise] [--gates exp,sigmoid,sigmoid-nonorm]
        [--shapes headline,t_sweep,head_sweep] [--chunks default,64,128,256,512]
        [--config block_q=64,num_stages=2] [--check | --check-only]
        [--package-root .baseline --label baseline] [--segments 0,8]

forward:  (q, k, v, i, f, initial state) -> (h, final c, n), return_state=True.
fwdbwd:   jax.value_and_grad of sum(h dh) + sum(c_T dc) + sum(n_T dn) (random cotangents) with
          respect to q, k, v, i, f, c0, n0, m0.
--segments: packed sequences, N segments of random lengths per row (segment_ids; 0 = none),
          timed side by side with the plain call (issue bar: <= 1.10x).
--check:  h, c_T and every gradient of the call in the shape's dtype against a float32
          implementation="chunkwise" call (HIGHEST matmul precision) on the same (dtype-valued)
          inputs, at B=2 T=4096 (specs.check_shape); relative RMS error, bound 2e-2 for 16-bit
          inputs and 1e-4 for float32. Exit status 1 if a check fails.
Timing: --batch calls back to back per sample, synchronised once (common.time_jax; 1 = each call
synchronised, the timing of the README's tables before 2026-12-01 evening).
Works with both tfla_jax APIs (common.Tfla). --chunks applies to the kernel implementations;
"chunkwise" runs at its default chunk. Counts, timer and table: common.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import specs  # noqa: E402

XLA_IMPLS = ("recurrent", "parallel", "chunkwise")
GRAD_NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="auto",
                   help="comma-separated tfla_jax.mlstm implementations; auto: every kernel "
                        "backend available + chunkwise")
    p.add_argument("--gates", default="exp,sigmoid", help="exp, sigmoid, sigmoid-nonorm")
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--shapes", default="headline", help=f"sets from specs.py: {', '.join(specs.SETS)}")
    p.add_argument("--chunks", default="default",
                   help="chunk sizes for the kernel implementations, 'default' = the package's")
    p.add_argument("--segments", default="0",
                   help="segments per row (random lengths) passed as segment_ids; 0 = none")
    p.add_argument("--config", default="", help="key=value,... applied with dataclasses.replace "
                   "to the backend's default config")
    p.add_argument("--check", action="store_true",
                   help="after timing, compare with float32 chunkwise (exit 1 on a failure)")
    p.add_argument("--check-only", action="store_true", help="the comparison, no timing")
    p.add_argument("--package-root", help="import tfla_jax from this directory (an old copy)")
    p.add_argument("--label", default="current", help="tag of every row (side-by-side runs)")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=10,
                   help="calls per timing sample, synchronised once (common.time_jax); 1: "
                        "every call synchronised")
    p.add_argument("--peak-tflops", type=float, help="default: common.PEAKS by device")
    p.add_argument("--peak-tbps", type=float)
    p.add_argument("--name", default="bench_mlstm", help="JSON file name under --out")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args(argv)


def build(api, impl, shape, gate, chunk, overrides, interpret, fwdbwd, segments=0):
    """(jitted fn, argument names, config or None) for one case (segments > 0: the inputs'
    "seg" ids go in as segment_ids, after the other arguments)."""
    import jax
    import jax.numpy as jnp

    gate_kw = common.gate_options(gate)
    kw, cfg = api.call_kwargs(impl, shape.K, shape.V, shape.T, jnp.dtype(shape.dtype),
                              gate_kw["input_gate"], None if impl in XLA_IMPLS else chunk,
                              overrides)
    if interpret and impl not in XLA_IMPLS:
        kw["interpret"] = True
    opts = dict(kw, **gate_kw, return_state=True)

    seg = ("seg",) if segments else ()

    def forward(q, k, v, i, f, c0, n0, m0, *seg_ids):
        kw = dict(segment_ids=seg_ids[0]) if seg_ids else {}
        h, s = api.m.mlstm(q, k, v, i, f, initial_state=api.m.MLSTMState(c0, n0, m0), **opts,
                           **kw)
        return h, s.c, s.n

    if not fwdbwd:
        return jax.jit(forward), GRAD_NAMES + seg, cfg

    def loss(q, k, v, i, f, c0, n0, m0, dh, dc, dn, *seg_ids):
        h, c, n = forward(q, k, v, i, f, c0, n0, m0, *seg_ids)
        return (jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32)) + jnp.sum(c * dc)
                + jnp.sum(n * dn))

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(GRAD_NAMES)))))
    return step, GRAD_NAMES + ("dh", "dc", "dn") + seg, cfg


def input_sets(shape, seed, n=None, segments=8):
    """n (default: enough to beat the L2) input sets of `shape` as dicts (with "seg": segment
    ids of `segments` random-length segments per row)."""
    make = lambda j: dict(  # noqa: E731
        common.mlstm_inputs(seed + j, shape.B, shape.T, shape.H, shape.K, shape.V, shape.dtype),
        seg=common.segment_ids(seed + j, shape.B, shape.T, segments))
    first = make(0)
    n = n or common.n_sets_for(common.set_bytes(first.values()))
    return [first] + [make(j) for j in range(1, n)]


def case_row(label, impl, gate, pas, shape, **kw):
    return dict(label=label, impl=impl, gate=gate, **{"pass": pas}, segments=kw.pop("segments", 0),
                B=shape.B, T=shape.T,
                H=shape.H, K=shape.K, V=shape.V, dtype=shape.dtype, **kw)


def error_row(row, e):
    msg = str(e).strip().splitlines()
    return dict(row, error=f"{type(e).__name__}: {msg[0] if msg else ''}"[:300])


def bench_case(api, impl, shape, gate, chunk, pas, sets, args, peaks, overrides, segments=0):
    """One timed row: median/min/p90 ms, TFLOP/s, roofline fraction, compiled peak memory."""
    import dataclasses

    import jax.numpy as jnp

    row = case_row(args.label, impl, gate, pas, shape, chunk_requested=chunk, segments=segments)
    try:
        fn, names, cfg = build(api, impl, shape, gate, chunk, overrides, args.interpret,
                               pas == "fwdbwd", segments)
        arg_sets = [tuple(s[n] for n in names) for s in sets]
        t = common.time_jax(fn, arg_sets, args.reps, args.warmup, args.batch)
        dt = jnp.dtype(shape.dtype)
        L = api.chunk_used(impl, shape.K, shape.V, shape.T, dt,
                           common.gate_options(gate)["input_gate"],
                           None if impl in XLA_IMPLS else chunk, cfg)
        flop, byts = common.mlstm_counts(shape.B, shape.T, shape.H, shape.K, shape.V,
                                         L or min(256, shape.T), dt.itemsize, pas == "fwdbwd")
        mem = common.compiled_peak_bytes(fn, *arg_sets[0])
        row.update(chunk=L, **t, **common.roofline(t["ms"], flop, byts, peaks),
                   peak_mem_gb=None if mem is None else mem / 1e9,
                   config=None if cfg is None else dataclasses.asdict(cfg))
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        row = error_row(dict(row, chunk=chunk), e)
    common.log_row(row)
    return row


def rel_err(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_case(api, impl, shape, gate, chunk, args, overrides, seed):
    """h, c_T and all gradients of `impl` in shape.dtype vs float32 chunkwise, same inputs."""
    import jax
    import jax.numpy as jnp

    row = case_row(args.label, impl, gate, "check", shape, chunk=chunk)
    try:
        x = input_sets(shape, seed, n=1)[0]
        fwd, names, _ = build(api, impl, shape, gate, chunk, overrides, args.interpret, False)
        grad, gnames, _ = build(api, impl, shape, gate, chunk, overrides, args.interpret, True)
        got_h = fwd(*(x[n] for n in names))
        _, got_g = grad(*(x[n] for n in gnames))
        up = {n: a.astype(jnp.float32) for n, a in x.items()}
        ref_shape = specs.Shape(shape.B, shape.T, shape.H, shape.K, shape.V, "float32")
        with jax.default_matmul_precision("highest"):
            rfwd, _, _ = build(api, "chunkwise", ref_shape, gate, None, None, False, False)
            rgrad, _, _ = build(api, "chunkwise", ref_shape, gate, None, None, False, True)
            want_h = rfwd(*(up[n] for n in names))
            _, want_g = rgrad(*(up[n] for n in gnames))
        errs = dict(err_h=rel_err(got_h[0], want_h[0]), err_c=rel_err(got_h[1], want_h[1]))
        for n, a, b in zip(GRAD_NAMES, got_g, want_g):
            if n == "m0" and gate != "exp":  # m only exists for the exponential input gate
                continue
            errs[f"err_d{n}"] = rel_err(a, b)
        tol = 1e-4 if shape.dtype == "float32" else 2e-2
        row.update(errs, tol=tol, ok=all(e <= tol for e in errs.values()))
    except Exception as e:  # noqa: BLE001
        row = error_row(dict(row, ok=False), e)
    common.log_row(row)
    return row


CHECK_COLUMNS = [c for c in common.COLUMNS if c[0] in ("label", "impl", "gate", "B", "T", "H",
                                                        "K", "V", "chunk", "error")] + [
    (f"err_{n}", n, "{:.1e}") for n in ("h", "c") + tuple(f"d{g}" for g in GRAD_NAMES)] + [
    ("ok", "ok", "{}")]


def main(argv=None):
    args = parse_args(argv)
    tfla = common.import_tfla(args.package_root)
    import jax

    api = common.Tfla(tfla)
    info = common.run_info(label=args.label, **api.info())
    peaks = common.peaks_for(info["device"], args.peak_tflops, args.peak_tbps)
    info["peaks"] = peaks
    impls = (api.default_impls(args.interpret) if args.impls == "auto"
             else args.impls.split(","))
    gates = args.gates.split(",")
    chunks = [None if c == "default" else int(c) for c in args.chunks.split(",")]
    segments = [int(x) for x in args.segments.split(",")]
    overrides = common.parse_overrides(args.config)
    shapes = specs.shapes(args.shapes)
    print(f"{info['device']} ({jax.default_backend()}), jax {jax.__version__}, tfla_jax from "
          f"{info['tfla_jax_file']} ({info['api']} API); impls {impls}; overrides {overrides}",
          flush=True)
    rows, checks = [], []

    def add(row):  # the JSON after every row: a run cut by its time limit keeps what it measured
        rows.append(row)
        common.write_results(args.out, args.name, rows, info, table=False)

    missing = [m for m in impls if not api.available(m, args.interpret)]
    for n, shape in enumerate([] if args.check_only else shapes):
        sets = input_sets(shape, 1000 * n, segments=max(segments))
        for impl in impls:
            for gate in gates:
                for chunk in (chunks if impl not in XLA_IMPLS else [None]):
                    for pas in args.passes.split(","):
                        for nseg in segments:
                            add(case_row(args.label, impl, gate, pas, shape, segments=nseg,
                                         chunk_requested=chunk,
                                         error="not available in this package/device")
                                if impl in missing else
                                bench_case(api, impl, shape, gate, chunk, pas, sets, args,
                                           peaks, overrides, nseg))
        del sets
    cshapes = list(dict.fromkeys(specs.check_shape(s) for s in shapes))
    for n, cshape in enumerate(cshapes if args.check or args.check_only else []):
        for impl in (m for m in impls if m not in missing):
            for gate in gates:
                checks.append(check_case(api, impl, cshape, gate, chunks[0], args, overrides,
                                         7 + n))
    if rows:
        common.write_results(args.out, args.name, rows, info)
    if checks:
        common.write_results(args.out, args.name + "_check", checks, info, CHECK_COLUMNS)
    return 1 if any(not r.get("ok") for r in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
