"""Ops per decode step of `generate` in the optimized HLO (the kernel-count proxy of issue 13).

Lowers and compiles `layers._generate` abstractly (ShapeDtypeStructs, nothing allocated) and counts
the top-level instructions of one iteration of its token loop, i.e. one decode step: #ops (each a
kernel launch on a GPU; parameters, tuples, bitcasts and the like are free), #fusion (of those,
fusions) and #dot (dots, fused or not); per step and per block (step / num_blocks). Also the
compiled memory of the whole program (arguments + outputs + temporaries - aliases).

    PYTHONPATH=. python benchmarks/decode_hlo.py --config 7b --batch 1

The counts are those of this backend's compiler (CPU here: fusion decisions differ from the GPU's,
bf16 dots are upcast to float32); compare them across versions, not with GPU kernel counts.
"""

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hlo_cost import _FREE, parse_hlo  # noqa: E402


def config(name, float32=False):
    """bench_generate's configs: bf16 parameters and compute (tiny: float32), blocks scanned."""
    import jax.numpy as jnp

    from tfla_jax.layers import xLSTMConfig

    dt = {} if not float32 else dict(dtype=jnp.float32)
    if name == "7b":
        return xLSTMConfig.xlstm_7b(param_dtype=dt.get("dtype", jnp.bfloat16), scan_blocks=True,
                                    **dt)
    if name == "medium":
        return xLSTMConfig.medium(param_dtype=dt.get("dtype", jnp.bfloat16), **dt)
    return xLSTMConfig.tiny(scan_blocks=True)


def compile_generate(cfg, batch, new_tokens):
    """The compiled `_generate` of an abstract model: prompt (batch, 4), greedy, no eos."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tfla_jax import layers

    graphdef, variables = nnx.split(nnx.eval_shape(lambda: layers.xLSTMLM(cfg, rngs=nnx.Rngs(0))))
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    return layers._generate.lower(
        graphdef, variables, jax.ShapeDtypeStruct((batch, 4), jnp.int32), None,
        jax.eval_shape(lambda: jax.random.key(0)), scalar(jnp.float32), True,
        scalar(jnp.int32), max_new_tokens=new_tokens, top_k=None).compile()


def step_counts(text, trip):
    """Counter of the op names of one iteration of ENTRY's `trip`-iteration loop (top level;
    loops nested in it count their body times their trip count, under 'while' their number), and
    'dot' (dots at any fusion depth), 'ops' (every op that is not free, see hlo_cost._FREE)."""
    comps, entry = parse_hlo(text)
    loops = [i for i in comps[entry] if i["op"] == "while" and i["trip"] == trip]
    if len(loops) != 1:
        raise ValueError(f"expected one loop of {trip} iterations in ENTRY, found {len(loops)}")
    counts = collections.Counter()

    def dots(i):
        inner = comps.get(i["calls"][0], []) if i["op"] == "fusion" else []
        return (i["op"] == "dot") + sum(dots(j) for j in inner)

    def walk(comp, mult):
        for i in comps[comp]:
            if i["op"] == "while":
                counts["while"] += mult
                walk(i["body"], mult * (i["trip"] or 1))
            elif i["op"] in ("call", "conditional"):
                for c in i["calls"]:
                    walk(c, mult)
            elif i["op"] not in _FREE:
                counts["ops"] += mult
                counts[i["op"]] += mult
                counts["dot_any"] += mult * dots(i)

    walk(loops[0]["body"], 1)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("7b", "medium", "tiny"), default="7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--float32", action="store_true",
                   help="float32 parameters and compute (no CPU upcast of bf16 weights)")
    p.add_argument("--ops", action="store_true", help="also every op name's count per step")
    args = p.parse_args(argv)
    cfg = config(args.config, args.float32)
    compiled = compile_generate(cfg, args.batch, args.new_tokens)
    c = step_counts(compiled.as_text(), args.new_tokens - 1)
    nb = cfg.num_blocks
    print(f"{args.config}, batch {args.batch}, {nb} blocks; one decode step:")
    print("| count | per step | per block |\n| --- | --- | --- |")
    for key, label in (("dot_any", "#dot"), ("fusion", "#fusion"), ("ops", "#ops")):
        print(f"| {label} | {c[key]} | {c[key] / nb:.2f} |")
    m = compiled.memory_analysis()
    if m is not None:
        peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
        print(f"compiled memory (MB): arguments {m.argument_size_in_bytes / 1e6:,.1f}, temporaries "
              f"{m.temp_size_in_bytes / 1e6:,.1f}, peak {peak / 1e6:,.1f}")
    if args.ops:
        skip = {"ops", "dot_any"}
        print(", ".join(f"{k} {v}" for k, v in c.most_common() if k not in skip))


if __name__ == "__main__":
    main()
