"""The cost of the context-parallel machinery on one device: `tfla_jax.mlstm` plain, inside a
1-device `jax.shard_map`, and inside it with `context_axis` over that 1-device axis.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_context.py --out $OUT
        [--shapes headline] [--gates exp,sigmoid] [--passes fwd,fwdbwd] [--impl auto]
    PYTHONPATH=. python3 benchmarks/bench_context.py --shapes smoke --interpret   # CPU smoke

forward:  (q, k, v, i, f, initial state) -> (h, final c, n), return_state=True.
fwdbwd:   jax.value_and_grad of sum(h dh) + sum(c_T dc) + sum(n_T dn) with respect to q, k, v, i,
          f, c0, n0, m0 (as bench_mlstm.py).
Variants: "plain" (no shard_map), "shard_map" (the call inside a 1-device shard_map over the
axis "ctx", T split over it), "context" (the same with context_axis="ctx"). With a 1-device axis
the summary pass is skipped statically, so the bar (issue 12) is context / plain < 1.03; the
table's "vs plain" column is that ratio. Pallas interpret mode cannot run under shard_map's vma
checks (a JAX limitation), so --interpret runs the shard_maps with check_vma=False.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import specs  # noqa: E402

VARIANTS = ("plain", "shard_map", "context")
NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")
BAR = 1.03
COLUMNS = [("label", "variant", "{}"), ("impl", "impl", "{}"), ("gate", "gate", "{}"),
           ("pass", "pass", "{}"), ("B", "B", "{}"), ("T", "T", "{}"), ("H", "H", "{}"),
           ("K", "K", "{}"), ("V", "V", "{}"), ("ms", "ms", "{:.3f}"), ("min_ms", "min", "{:.3f}"),
           ("p90_ms", "p90", "{:.3f}"), ("vs_plain", "vs plain", "{:.3f}"),
           ("error", "error", "{:.90}")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="headline",
                   help=f"sets from specs.py: {', '.join(specs.SETS)}")
    p.add_argument("--gates", default="exp,sigmoid", help="exp, sigmoid, sigmoid-nonorm")
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--impl", default="auto",
                   help="tfla_jax.mlstm implementation; auto: implementation=None (the fastest)")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--name", default="bench_context", help="JSON file name under --out")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args(argv)


def build(tfla, variant, impl, gate, fwdbwd, interpret):
    """The jitted forward (or value_and_grad) of one variant; arguments NAMES (+ dh, dc, dn)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    opts = dict(common.gate_options(gate), return_state=True,
                implementation=None if impl == "auto" else impl)
    if interpret:
        opts["interpret"] = True

    def cell(q, k, v, i, f, c0, n0, m0, context_axis=None):
        h, s = tfla.mlstm(q, k, v, i, f, initial_state=tfla.MLSTMState(c0, n0, m0),
                          context_axis=context_axis, **opts)
        return h, s.c, s.n

    if variant == "plain":
        forward = cell
    else:
        mesh = Mesh(np.asarray(jax.devices()[:1]), ("ctx",))
        seq, rep = P(None, "ctx"), P()
        axis = "ctx" if variant == "context" else None
        # Without context_axis the state does not vary over "ctx" only by luck of the values:
        # return it per device (a 1-device axis: the same array) to keep the types honest.
        out_state = rep if variant == "context" else P("ctx")
        forward = jax.shard_map(
            lambda *a: cell(*a, context_axis=axis), mesh=mesh,
            in_specs=(seq,) * 5 + (rep,) * 3, out_specs=(seq, out_state, out_state),
            check_vma=not interpret)

    if not fwdbwd:
        return jax.jit(forward), NAMES

    def loss(q, k, v, i, f, c0, n0, m0, dh, dc, dn):
        h, c, n = forward(q, k, v, i, f, c0, n0, m0)
        return (jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32)) + jnp.sum(c * dc)
                + jnp.sum(n * dn))

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(NAMES))))), NAMES + (
        "dh", "dc", "dn")


def main(argv=None):
    args = parse_args(argv)
    import jax

    import tfla_jax

    shapes = specs.shapes(args.shapes)
    rows = []
    for shape in shapes:
        first = common.mlstm_inputs(0, shape.B, shape.T, shape.H, shape.K, shape.V, shape.dtype)
        n = common.n_sets_for(common.set_bytes(first.values()))
        sets = [first] + [common.mlstm_inputs(j, shape.B, shape.T, shape.H, shape.K, shape.V,
                                              shape.dtype) for j in range(1, n)]
        for gate in args.gates.split(","):
            for pas in args.passes.split(","):
                plain_ms = None
                for variant in VARIANTS:
                    row = dict(label=variant, impl=args.impl, gate=gate, **{"pass": pas},
                               B=shape.B, T=shape.T, H=shape.H, K=shape.K, V=shape.V,
                               dtype=shape.dtype)
                    try:
                        fn, names = build(tfla_jax, variant, args.impl, gate, pas == "fwdbwd",
                                          args.interpret)
                        t = common.time_jax(fn, [tuple(s[k] for k in names) for s in sets],
                                            args.reps, args.warmup)
                        row.update(t)
                        plain_ms = t["ms"] if variant == "plain" else plain_ms
                        if plain_ms:
                            row["vs_plain"] = t["ms"] / plain_ms
                    except Exception as e:  # noqa: BLE001  (a failed case is a row, not a crash)
                        msg = str(e).strip().splitlines()
                        row["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
                    rows.append(row)
                    print({k: row.get(k) for k in ("label", "gate", "pass", "ms", "vs_plain",
                                                   "error")}, flush=True)
                    jax.clear_caches()
    info = common.run_info(bench="bench_context", interpret=args.interpret, bar=BAR)
    common.write_results(args.out, args.name, rows, info, columns=COLUMNS)
    ctx = [r for r in rows if r["label"] == "context" and "vs_plain" in r]
    worst = max((r["vs_plain"] for r in ctx), default=None)
    if worst is not None:
        verdict = "meets" if worst < BAR else "misses"
        note = "; CPU timings are noise" if args.interpret else ""
        print(f"context-parallel machinery on a 1-device axis: worst context / plain = {worst:.3f}"
              f" ({verdict} the < {BAR:.2f} bar{note})")
    return rows


if __name__ == "__main__":
    main()
