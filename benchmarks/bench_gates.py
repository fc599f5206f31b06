"""The gate preparation alone (`tfla_jax.ref.gate_rows`, shared by the kernel backends) and the
single scans it is built from, each as its own jitted call at the headline shape.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_gates.py --out $OUT
    PYTHONPATH=. python3 benchmarks/bench_gates.py --smoke --out /tmp/b        # CPU

Every row includes the dispatch and synchronisation of one call (common.time_jax), a floor of
~0.085 ms on the H200: a row at the floor costs nothing measurable by itself.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

K_SCALE = 256 ** -0.5   # the headline K's query scale

COLUMNS = [("case", "case", "{}"), ("B", "B", "{}"), ("T", "T", "{}"), ("H", "H", "{}"),
           ("L", "L", "{}"), ("ms", "ms", "{:.4f}"), ("min_ms", "min", "{:.4f}"),
           ("error", "error", "{:.90}")]


def cases(B, T, H, L):
    """(name, fn, args) of every timed call."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from tfla_jax import gates
    from tfla_jax.ref import chunkwise

    ks = jax.random.split(jax.random.key(0), 3)
    i = jax.random.normal(ks[0], (B, T, H))
    f = jax.random.normal(ks[1], (B, T, H)) + common.F_BIAS
    m0 = jnp.zeros((B, H))
    seg = jnp.zeros((B, T), bool).at[:, ::1000].set(True)
    x = jax.random.normal(ks[2], (B, H, T // L, L))
    rows = lambda gate: lambda i, f, *s: chunkwise.gate_rows(  # noqa: E731
        i, f, chunk_size=L, input_gate=gate, m0=m0, scale=K_SCALE,
        seg_start=s[0] if s else None)
    return [
        ("gate_rows exp", rows("exp"), (i, f)),
        ("gate_rows sigmoid", rows("sigmoid"), (i, f)),
        ("gate_rows exp, segment starts", rows("exp"), (i, f, seg)),
        ("transpose + log_sigmoid", lambda i, f: (jax.nn.log_sigmoid(jnp.swapaxes(f, 1, 2)),
                                                  jnp.swapaxes(i, 1, 2)), (i, f)),
        ("cumsum", lambda x: lax.cumsum(x, axis=3), (x,)),
        ("cumsum reverse", lambda x: lax.cumsum(x, axis=3, reverse=True), (x,)),
        ("cummax (int)", lambda x: lax.cummax(x, axis=3), ((x > 1.5).astype(jnp.int32),)),
        ("compensated_cumsum", gates.compensated_cumsum, (x,)),
        ("stabiliser_maps", lambda x: gates.stabiliser_maps(x, 2 * x), (x,)),
    ]



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="B=1 T=512 H=2 (CPU)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    import jax

    B, T, H = (1, 512, 2) if args.smoke else (8, 8192, 8)
    info = common.run_info()
    rows = []
    for name, fn, fargs in cases(B, T, H, args.chunk):
        row = dict(case=name, B=B, T=T, H=H, L=args.chunk)
        try:
            row.update(common.time_jax(jax.jit(fn), [fargs], args.reps, 3))
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        common.log_row(row)
    common.write_results(args.out, "bench_gates", rows, info, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
