"""Where the GPU time goes: a jax.profiler trace of a few calls, GPU kernel time summed by name.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/profile_gpu.py train [train_lm flags]
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/profile_gpu.py prefill     # 7B, B 1, T 2048
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/profile_gpu.py decode      # 7B, B 1
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/profile_gpu.py mlstm --T 8192,32768

train: the medium preset's train step at 16 x 2048 (examples/train_lm.py, its defaults plus the
flags given), two steps; prefill: `model(prompt, return_state=True)` of the 7B shape (bf16,
`scan_blocks=True`, weights 0.01), two calls; decode: `generate` of 65 tokens after a 128-token
prompt, per decode step (prefill and decode run `layers.inference_form(model)`; `--built` profiles
the model as built); mlstm: `tfla_jax.mlstm` forward and forward+backward at 65,536 tokens, H 8,
K 256, V 512, bf16, per T of `--T` and gate of `--gates` (bench_mlstm's calls), three calls each.
Prints GPU busy time, kernels per step and the 40 largest kernels; writes <out>/prof_<mode>.json
(mlstm: prof_mlstm_T<T>_<gate>_<pass>.json). The trace is the profiler's Perfetto JSON (no
TensorBoard needed).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time


def kernel_times(trace_dir, steps, out, tag, top=40):
    """Sums the GPU stream events of the trace under trace_dir; prints and writes the table of
    the `top` largest kernels; returns the GPU busy ms per step."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    ev = json.load(gzip.open(files[-1]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    meta = lambda kind: {(e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]:  # noqa: E731
                         e["args"]["name"] for e in ev
                         if e.get("ph") == "M" and e.get("name") == kind}
    process, thread = meta("process_name"), meta("thread_name")
    total, count, span = collections.Counter(), collections.Counter(), [float("inf"), 0.0]
    for e in ev:
        if (e.get("ph") != "X" or "GPU" not in process.get(e["pid"], "")
                or "tream" not in thread.get((e["pid"], e["tid"]), "")):
            continue
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
        span = [min(span[0], e["ts"]), max(span[1], e["ts"] + e["dur"])]
    if not total:
        raise SystemExit("no GPU stream events in the trace (run on a GPU)")
    busy = sum(total.values()) / steps / 1e3
    print(f"[{tag}] GPU busy {busy:.2f} ms per step over {(span[1] - span[0]) / steps / 1e3:.2f} "
          f"ms, kernels per step {sum(count.values()) / steps:.0f}")
    rows = [dict(name=n[:120], ms_per_step=us / steps / 1e3, calls_per_step=count[n] / steps)
            for n, us in total.most_common(top)]
    for r in rows:
        print(f"{r['ms_per_step']:8.3f} ms {r['calls_per_step']:6.0f}x  {r['name']}")
    with open(os.path.join(out, f"prof_{tag}.json"), "w") as fh:
        json.dump(dict(rows=rows, busy_ms=busy, kernels=sum(count.values()) / steps), fh, indent=1)
    return busy


def seven_b():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tfla_jax import layers

    cfg = layers.xLSTMConfig.xlstm_7b(param_dtype=jnp.bfloat16, scan_blocks=True)
    model = nnx.eval_shape(lambda: layers.xLSTMLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    fill = lambda a: jnp.full(a.shape, 0.01 if jnp.issubdtype(a.dtype, jnp.floating) else 0,  # noqa: E731
                              a.dtype)
    return graphdef, jax.tree.map(fill, abstract)


def profile_mlstm(args, trace):
    """Per T and gate: the forward and forward+backward of bench_mlstm, three calls each."""
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_mlstm
    import common
    import specs

    api = common.Tfla(common.import_tfla())
    for T in (int(t) for t in args.T.split(",")):
        shape = specs.Shape(B=specs.TOKENS // T, T=T, H=8, K=256, V=512)
        arrays = bench_mlstm.input_sets(shape, 0, n=1)[0]
        for gate in args.gates.split(","):
            for fwdbwd in (False, True):
                fn, names, _ = bench_mlstm.build(api, args.impl, shape, gate, None, {}, False,
                                                 fwdbwd)
                call = lambda: fn(*(arrays[n] for n in names))  # noqa: E731
                for _ in range(3):
                    jax.block_until_ready(call())
                tag = f"mlstm_T{T}_{gate}_{'fwdbwd' if fwdbwd else 'fwd'}"
                with jax.profiler.trace(f"{trace}/{tag}", create_perfetto_trace=True):
                    for _ in range(3):
                        jax.block_until_ready(call())
                kernel_times(f"{trace}/{tag}", 3, args.out, tag)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("train", "prefill", "decode", "mlstm"))
    p.add_argument("--built", action="store_true", help="prefill / decode: the model as built")
    p.add_argument("--T", default="8192,32768", help="mlstm: sequence lengths")
    p.add_argument("--gates", default="exp,sigmoid", help="mlstm: bench_mlstm gate names")
    p.add_argument("--impl", default="pallas", help="mlstm: the implementation")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args, extra = p.parse_known_args(argv)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    trace = f"/tmp/profile_gpu_{args.mode}"
    if args.mode == "train":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "examples"))
        import train_lm
        flags = ["--preset", "medium", "--batch-size", "16", "--seq-len", "2048", "--steps", "10",
                 "--warmup-steps", "2", "--max-corpus-bytes", "8000000",
                 "--out-dir", "/tmp/profile_gpu_unused"] + extra
        run = train_lm.setup(train_lm.build_parser().parse_args(flags))
        state = run.init_state()
        step = train_lm.make_train_step(run.graphdef, run.tx, run.schedule, run.mesh,
                                        run.param_dims, run.param_specs, run.state_shardings,
                                        **train_lm.step_options(run.args))
        step = step.lower(state, run.batch()).compile()
        for _ in range(3):
            state, _ = step(state, run.batch())
        jax.block_until_ready(state)
        with jax.profiler.trace(trace, create_perfetto_trace=True):
            for _ in range(2):
                state, _ = step(state, run.batch())
            jax.block_until_ready(state)
        kernel_times(trace, 2, args.out, "train")
        return
    if args.mode == "mlstm":
        profile_mlstm(args, trace)
        return
    from tfla_jax import layers
    graphdef, variables = seven_b()
    if not args.built:
        graphdef, variables = nnx.split(layers.inference_form(nnx.merge(graphdef, variables)))
    if args.mode == "prefill":
        prefill = jax.jit(lambda v, p: nnx.merge(graphdef, v)(p, return_state=True))
        prompt = jnp.ones((1, 2048), jnp.int32)
        jax.block_until_ready(prefill(variables, prompt))
        t0 = time.perf_counter()
        for _ in range(10):
            jax.block_until_ready(prefill(variables, prompt))
        print(f"prefill {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms per call (synchronised)")
        with jax.profiler.trace(trace, create_perfetto_trace=True):
            for _ in range(2):
                jax.block_until_ready(prefill(variables, prompt))
        kernel_times(trace, 2, args.out, "prefill")
        return
    model, prompt, n = nnx.merge(graphdef, variables), jnp.ones((1, 128), jnp.int32), 65
    for tokens in (1, n):
        jax.block_until_ready(layers.generate(model, prompt, tokens))
    with jax.profiler.trace(trace, create_perfetto_trace=True):
        jax.block_until_ready(layers.generate(model, prompt, n))
    kernel_times(trace, n - 1, args.out, "decode")   # the prefill's kernels are a small remainder


if __name__ == "__main__":
    main()
