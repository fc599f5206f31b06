"""End-to-end training throughput of the example LM (examples/train_lm.py) on a GPU.

Builds the exact train step of examples/train_lm.py (shard_map'd forward + backward, optax AdamW,
bf16 compute with float32 parameters, the NaN guard) for each preset and mLSTM implementation,
feeds it real batches of the default corpus, and after compilation and warm-up times --steps steps.
Reports tokens/s and model FLOP utilisation (MFU):

    MFU = tokens/s * flops_per_token / peak
    flops_per_token = 6 N + 3 * num_blocks * H * (4 K V + L (K + V))

N: parameters without the embedding table (the table is a lookup, not a matmul); the second term is
the mLSTM cell (train_lm.model_flops_per_token: chunk states k v^T and read-out q C, 4 K V per token
and head forward, plus the causal, attention-like q k^T and (q k^T) v inside chunks of length L,
L (K + V)); backward counted as twice the forward. peak: the dense bf16 matrix-product rate
measured on the machine kind (common.PEAKS: H200 790, H100 800 TFLOP/s; --peak-tflops to change).
Peak memory: the allocator's lifetime peak on device 0 after the timed steps (of the process: run
the presets smallest first), and XLA's compiled memory analysis of the step.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_train.py --out $OUT
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_train.py --presets small \
        --implementations pallas --steps 50 --out $OUT

Prints one JSON line per configuration, then a table; writes $OUT/bench_train.json (or --out).
"""

import argparse
import os
import sys
import time
import traceback

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import train_lm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# Per preset: (sequences per step, sequence length); about 64K / 32K tokens per step.
SHAPES = {"tiny": (16, 256), "small": (32, 2048), "medium": (16, 2048), "large": (16, 2048)}
# Presets that run with --remat whatever the flag says (without, the activations of the ~1.2B
# model at 32K tokens per step exceed the H200's 141 GB).
REMAT = ("large",)


COLUMNS = [("preset", "preset", "{}"), ("implementation", "mLSTM implementation", "{}"),
           ("params_m", "params M", "{:.1f}"), ("batch", "batch", "{}"),
           ("seq_len", "seq", "{}"), ("chunk", "L", "{}"), ("step_ms", "step ms", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"), ("model_tflops", "model TFLOP/s", "{:.1f}"),
           ("mfu", "MFU", "{:.1%}"), ("peak_mem_gb", "peak mem GB", "{:.1f}"),
           ("compiled_mem_gb", "compiled GB", "{:.1f}"), ("remat", "remat", "{}"),
           ("compile_s", "compile s", "{:.0f}"), ("error", "error", "{:.120}")]


def chunk_size_used(cfg, impl: str, seq_len: int) -> int:
    """The chunk length L the implementation runs with (for the FLOP count)."""
    import tfla_jax

    L = common.Tfla(tfla_jax).chunk_used(impl, cfg.qk_head_dim, cfg.v_head_dim, seq_len,
                                         cfg.dtype, "exp", cfg.chunk_size)
    return L or min(256, seq_len)


def bench_one(preset, impl, args):
    batch, seq_len = SHAPES[preset]
    batch, seq_len = args.batch_size or batch, args.seq_len or seq_len
    flags = ["--preset", preset, "--mlstm-implementation", impl, "--batch-size", str(batch),
             "--seq-len", str(seq_len), "--grad-accum", str(args.grad_accum),
             "--steps", str(args.warmup + args.steps), "--warmup-steps", "2",
             "--max-corpus-bytes", "8000000", "--out-dir", "/tmp/bench_train_unused"]
    if args.remat or preset in REMAT:
        flags.append("--remat")
    elif args.remat is False:
        flags.append("--no-remat")
    if args.loss_chunk:
        flags += ["--loss-chunk", str(args.loss_chunk)]
    if args.remat_policy:
        flags += ["--remat-policy", args.remat_policy]
    if args.scan_blocks is not None:
        flags.append("--scan-blocks" if args.scan_blocks else "--no-scan-blocks")
    if args.dtype:
        flags += ["--dtype", args.dtype]
    run = train_lm.setup(train_lm.build_parser().parse_args(flags))
    cfg = run.cfg
    state = run.init_state()
    step_fn = train_lm.make_train_step(run.graphdef, run.tx, run.schedule, run.mesh,
                                       run.param_dims, run.param_specs, run.state_shardings,
                                       **train_lm.step_options(run.args))
    t0 = time.perf_counter()
    step_fn = step_fn.lower(state, run.batch()).compile()
    compile_s = time.perf_counter() - t0
    analysis = step_fn.memory_analysis()
    compiled_mem = None if analysis is None else (
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    losses = []
    for _ in range(args.warmup):
        state, m = step_fn(state, run.batch())
        losses.append(m["loss"])
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step_fn(state, run.batch())
        losses.append(m["loss"])
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in jax.device_get(losses)]
    tokens_per_s = args.steps * batch * seq_len / seconds
    L = chunk_size_used(cfg, impl, seq_len)
    flops_per_token = train_lm.model_flops_per_token(cfg, L)
    mem = common.device_peak_bytes()
    return dict(
        device=jax.devices()[0].device_kind, num_devices=run.mesh.size, preset=preset,
        implementation=impl, dtype=cfg.dtype.name, params_m=cfg.num_params / 1e6,
        d=cfg.embedding_dim, blocks=cfg.num_blocks, heads=cfg.num_heads, K=cfg.qk_head_dim,
        V=cfg.v_head_dim, chunk=L, batch=batch, seq_len=seq_len, grad_accum=args.grad_accum,
        remat=cfg.remat and cfg.remat_policy, scan_blocks=cfg.scan_blocks,
        loss_chunk=args.loss_chunk, steps_timed=args.steps,
        compile_s=compile_s,
        step_ms=seconds / args.steps * 1e3, tokens_per_s=tokens_per_s,
        flops_per_token=flops_per_token, model_tflops=tokens_per_s * flops_per_token / 1e12,
        mfu=tokens_per_s * flops_per_token / args.peak_flops,
        peak_tflops=args.peak_flops / 1e12, loss_first=losses[0], loss_last=losses[-1],
        losses_finite=bool(np.all(np.isfinite(losses))),
        peak_mem_gb=None if mem is None else mem / 1e9,
        compiled_mem_gb=None if compiled_mem is None else compiled_mem / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="small,medium",
                   help="of tiny, small, medium, large (~1.2B; always with --remat)")
    p.add_argument("--implementations", default="pallas,chunkwise",
                   help="comma-separated tfla_jax.mlstm implementations")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--batch-size", type=int, help="override the per-preset batch")
    p.add_argument("--seq-len", type=int, help="override the per-preset sequence length")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="default: train_lm's (on GPU)")
    p.add_argument("--remat-policy", help="train_lm --remat-policy (default: train_lm's)")
    p.add_argument("--scan-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="train_lm --scan-blocks / --no-scan-blocks (default: the preset's)")
    p.add_argument("--loss-chunk", type=int, default=0, help="train_lm --loss-chunk")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: train_lm's auto")
    p.add_argument("--peak-tflops", type=float, help="default: common.PEAKS by device")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test the script on CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "."),
                   help="directory for bench_train.json")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.allow_cpu:
        sys.exit(f"bench_train.py measures GPU training; the backend is {jax.default_backend()!r} "
                 "(--allow-cpu to smoke-test)")
    print(f"devices: {jax.devices()}", flush=True)
    info = common.run_info()
    args.peak_flops = common.peaks_for(info["device"], args.peak_tflops)[0]
    results = []
    for preset in args.presets.split(","):
        for impl in args.implementations.split(","):
            try:
                r = bench_one(preset, impl, args)
            except Exception as e:  # noqa: BLE001 - record (e.g. out of memory) and go on
                traceback.print_exc()
                r = dict(preset=preset, implementation=impl, error=f"{type(e).__name__}: {e}"[:2000])
            results.append(r)
            common.log_row(r)
            # after every configuration: a later failure keeps the earlier rows
            common.write_results(args.out, "bench_train", results, info, COLUMNS, table=False)
    common.write_results(args.out, "bench_train", results, info, COLUMNS)
    return results


if __name__ == "__main__":
    main()
