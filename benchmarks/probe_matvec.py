"""The 7B block's decode-shape matmuls, one weight at a time: GB/s of each form (which output
dtype, which width). Eight distinct weights per call (no L2 reuse), 10 calls per sample.

    PYTHONPATH=. python3 benchmarks/probe_matvec.py --out $OUT      # GPU, ~1 min
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import common

# name, d_in, d_out, output dtype (None: the operands')
FORMS = [("in12304_f32", 4096, 12304, jnp.float32), ("in12304_bf16", 4096, 12304, None),
         ("in12288_f32", 4096, 12288, jnp.float32), ("in12288_bf16", 4096, 12288, None),
         ("in12544_f32", 4096, 12544, jnp.float32), ("in12416_f32", 4096, 12416, jnp.float32),
         ("up21888_bf16", 4096, 21888, None), ("out4096_bf16", 4096, 4096, None),
         ("down10944_bf16", 10944, 4096, None), ("head50304_f32", 4096, 50304, jnp.float32)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    rows = []
    for B in map(int, args.batches.split(",")):
        for name, d_in, d_out, out_dtype in FORMS:
            x = jnp.ones((B, d_in), jnp.bfloat16)
            ws = [jax.random.normal(jax.random.key(j), (d_in, d_out), jnp.bfloat16)
                  for j in range(8)]
            fn = jax.jit(lambda x, ws, t=out_dtype: [
                lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=t)
                for w in ws])
            us = common.time_jax(fn, [(x, ws)], reps=20, warmup=3, batch=10)["ms"] * 1e3 / 8
            gbps = d_in * d_out * 2 / (us * 1e-6) / 1e9
            rows.append(dict(device=jax.devices()[0].device_kind, B=B, name=name, us=us,
                             GBps=gbps))
            print(f"| {B} | {name} | {us:.1f} us | {gbps:.0f} GB/s |", flush=True)
    with open(os.path.join(args.out, "probe_matvec.json"), "w") as f:
        json.dump(rows, f, indent=0)


if __name__ == "__main__":
    main()
