"""Baseline copy vs current tree, each in its own process, merged into one table with ratios.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/side_by_side.py --baseline-root .baseline \
        --out $OUT [bench_mlstm.py options, e.g. --impls pallas,pallas_triton --shapes t_sweep]

Defaults: the headline shape, both gates, forward and forward+backward, implementation "pallas"
(the old API's kernels; the new API's fastest Pallas backend). Runs bench_mlstm.py with
`--package-root <baseline-root> --label baseline`, then with `--label current`, and writes
side_by_side.json (both runs' info and the merged rows); ratio = current / baseline.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULTS = ["--shapes", "headline", "--gates", "exp,sigmoid", "--passes", "fwd,fwdbwd",
            "--impls", "pallas"]
KEY = ("impl", "gate", "pass", "B", "T", "H", "K", "V", "chunk_requested")
COLUMNS = [(k, h, "{}") for k, h in (("impl", "impl"), ("gate", "gate"), ("pass", "pass"),
                                      ("B", "B"), ("T", "T"), ("H", "H"), ("K", "K"),
                                      ("V", "V"), ("chunk_baseline", "L base"),
                                      ("chunk_current", "L cur"))] + [
    ("ms_baseline", "baseline ms", "{:.3f}"), ("ms_current", "current ms", "{:.3f}"),
    ("ratio", "current / baseline", "{:.3f}"), ("mem_baseline", "base mem GB", "{:.2f}"),
    ("mem_current", "cur mem GB", "{:.2f}"), ("roof_current", "cur roof %", "{:.1%}"),
    ("error", "error", "{:.90}")]


def run(label, out, extra, root=None, name=None):
    """bench_mlstm.py in a subprocess; returns its JSON (rows may be partial) and exit status."""
    name = name or label
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "bench_mlstm.py"),
           "--label", label, "--name", name, "--out", out, *DEFAULTS, *extra]
    if root:
        cmd += ["--package-root", root]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    path = os.path.join(out, f"{name}.json")
    data = json.load(open(path)) if os.path.exists(path) else dict(rows=[])
    return data, rc


def merge(base_rows, cur_rows):
    """One row per case of either run, with both times and current / baseline."""
    key = lambda r: tuple(r.get(k) for k in KEY)  # noqa: E731
    base, cur = {key(r): r for r in base_rows}, {key(r): r for r in cur_rows}
    merged = []
    for k in list(cur) + [k for k in base if k not in cur]:
        b, c = base.get(k, {}), cur.get(k, {})
        m = dict(zip(KEY, k), chunk_baseline=b.get("chunk"), chunk_current=c.get("chunk"),
                 ms_baseline=b.get("ms"), ms_current=c.get("ms"),
                 mem_baseline=b.get("peak_mem_gb"), mem_current=c.get("peak_mem_gb"),
                 roof_current=c.get("roofline_frac"))
        if m["ms_baseline"] and m["ms_current"]:
            m["ratio"] = m["ms_current"] / m["ms_baseline"]
        errs = [f"{n}: {x['error']}" for n, x in (("base", b), ("cur", c)) if x.get("error")]
        errs += [f"{n}: no such case" for n, x in (("base", b), ("cur", c)) if not x]
        if errs:
            m["error"] = "; ".join(errs)
        merged.append(m)
    return merged


def combine(datas):
    """One run's JSON from several rounds: per case the median of the rounds' medians."""
    import statistics
    out = dict(datas[0], rows=[])
    key = lambda r: tuple(r.get(k) for k in KEY)  # noqa: E731
    for row in datas[0]["rows"]:
        same = [r for d in datas for r in d["rows"] if key(r) == key(row) and r.get("ms")]
        if same:
            row = dict(row, ms=statistics.median(r["ms"] for r in same),
                       rounds=[r["ms"] for r in same])
        out["rows"].append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-root", default=".baseline",
                   help="directory holding the old tfla_jax/ (git archive, README.md)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--rounds", type=int, default=2, help="alternating-order rounds")
    args, extra = p.parse_known_args(argv)
    if not os.path.isdir(os.path.join(args.baseline_root, "tfla_jax")):
        sys.exit(f"no tfla_jax/ under {args.baseline_root!r}: make the copy first (README.md)")
    # Rounds alternate the order (baseline first, then current first): the GPU's clocks drift
    # over minutes of load, and a fixed order would favour one side. Per case, the median over
    # rounds of each round's median.
    runs = {"baseline": [], "current": []}
    rc_b = rc_c = 0
    for r in range(args.rounds):
        order = ["baseline", "current"] if r % 2 == 0 else ["current", "baseline"]
        for label in order:
            root = args.baseline_root if label == "baseline" else None
            data, rc = run(label, args.out, extra, root, name=f"{label}_{r}")
            runs[label].append(data)
            rc_b, rc_c = (rc_b or rc, rc_c) if label == "baseline" else (rc_b, rc_c or rc)
    base, cur = (combine(runs[k]) for k in ("baseline", "current"))
    rows = merge(base["rows"], cur["rows"])
    info = dict(common.run_info(), device=cur.get("device") or base.get("device"),
                baseline={k: v for k, v in base.items() if k != "rows"},
                current={k: v for k, v in cur.items() if k != "rows"},
                exit_status=dict(baseline=rc_b, current=rc_c))
    common.write_results(args.out, "side_by_side", rows, info, COLUMNS)
    return rc_b or rc_c


if __name__ == "__main__":
    sys.exit(main())
