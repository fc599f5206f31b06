"""Prefill and decode throughput of `tfla_jax.layers` (prefill = `model(prompt)`, decode =
`generate`) on the model in `layers.inference_form` (impl "ours", converted once before timing, as
a server would) and as built (impl "ours-built", `scan_blocks`), next to Hugging Face
transformers' PyTorch xLSTMForCausalLM built from the same config, random weights, bf16, in one
process; with the bandwidth / FLOP limits.

    decode ms/step = (generate(prompt, N) - generate(prompt, 1)) / (N - 1)    ours
                     (generate(prompt, N) - prefill(prompt)) / (N - 1)        HF
    decode limit   = max((weight bytes + 2 x state bytes) / peak B/s, 2 N_matmul B / peak FLOP/s)
    prefill limit  = max(weight bytes / peak B/s, (2 N_matmul + cell) B T / peak FLOP/s)

N_matmul: parameters without the embedding table; cell: the mLSTM's 4 K V + L (K + V) FLOP per
token, head and block (common.mlstm_counts). Peaks: common.PEAKS by device. The HF model runs its
native PyTorch kernels (mode "inference": chunkwise prefill, recurrent step); torch and transformers
are imported only on that path. Our `generate` prefills on the inference form too (for
"ours-built" after a once-per-call copy of the stacked block weights into it), so that
generate(prompt, 1) takes out everything but the N - 1 steps; "ours-built"'s prefill column is
`model(prompt)` on the stacked blocks.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_generate.py --models 7b \
        --batches 1,16 --prompts 2048 --out $OUT
    python benchmarks/bench_generate.py --smoke --out /tmp/b          # CPU, tiny config

Writes <out>/bench_generate.json after every row and prints a markdown table last.
"""

import argparse
import functools
import gc
import os
import sys
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COLUMNS = [("model", "model", "{}"), ("impl", "impl", "{}"), ("B", "B", "{}"),
           ("prompt", "prompt", "{}"), ("new_tokens", "new", "{}"),
           ("prefill_ms", "prefill ms", "{:.2f}"), ("prefill_limit_ms", "limit", "{:.2f}"),
           ("prefill_tok_s", "prefill tok/s", "{:,.0f}"),
           ("decode_ms", "decode ms/step", "{:.2f}"), ("decode_limit_ms", "limit", "{:.2f}"),
           ("decode_tok_s", "decode tok/s", "{:,.0f}"), ("decode_gbps", "GB/s", "{:.0f}"),
           ("error", "error", "{:.100}")]


def model_config(name):
    """The bf16 config of a --models name: 7b, medium (50304 vocabulary), tiny (CPU smoke)."""
    import jax.numpy as jnp

    from tfla_jax.layers import xLSTMConfig

    if name == "7b":
        return xLSTMConfig.xlstm_7b(param_dtype=jnp.bfloat16, scan_blocks=True)
    if name == "medium":
        return xLSTMConfig.medium(param_dtype=jnp.bfloat16)
    if name == "tiny":
        return xLSTMConfig.tiny(scan_blocks=True)
    raise ValueError(f"--models: unknown model {name!r} (7b, medium, tiny)")


def limits(cfg, B, T, peaks, chunk=64):
    """(prefill ms, decode ms per step) floors: module docstring."""
    pf, pb = peaks
    itemsize = 2 if cfg.param_dtype.itemsize == 2 else 4
    weights = cfg.num_params * itemsize
    matmul = cfg.num_params - cfg.vocab_size * cfg.embedding_dim
    H, K, V = cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
    cell = cfg.num_blocks * common.mlstm_counts(B, T, H, K, V, min(chunk, T), 2)[0]
    prefill = max(weights / pb, (2 * matmul * B * T + cell) / pf)
    state = cfg.num_blocks * B * H * (K * V + K + 1) * 4
    decode = max((weights + 2 * state) / pb, 2 * matmul * B / pf)
    return 1e3 * prefill, 1e3 * decode, weights + 2 * state


def ours(cfg, B, T, n, reps, built=False):
    """Our prefill and generate times (ms) for B prompts of T tokens and n new tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tfla_jax import layers

    model = nnx.jit(lambda: layers.xLSTMLM(cfg, rngs=nnx.Rngs(0)))()
    if not built:
        model = layers.inference_form(model)
    graphdef, variables = nnx.split(model)
    prompts = [jax.random.randint(jax.random.key(s), (B, T), 0, cfg.vocab_size, jnp.int32)
               for s in range(2)]

    @jax.jit
    def prefill(variables, tokens):
        logits, state = nnx.merge(graphdef, variables)(tokens, return_state=True)
        return logits[:, -1], state

    pre = common.time_jax(prefill, [(variables, p) for p in prompts], reps=reps)
    gen = common.time_jax(lambda p: layers.generate(model, p, n), [(p,) for p in prompts],
                          reps=reps)
    first = common.time_jax(lambda p: layers.generate(model, p, 1), [(p,) for p in prompts],
                            reps=reps)
    return pre, dict(gen, first_ms=first["ms"])


def hf(cfg, B, T, n, reps):
    """The same for transformers' xLSTMForCausalLM (native kernels, bf16, CUDA)."""
    import torch
    import transformers

    hf_cfg = transformers.xLSTMConfig(
        **cfg.to_hf_config(), mode="inference", chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native", step_kernel="native", use_cache=True,
        return_last_states=True, chunk_size=64)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.xLSTMForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    prompts = [torch.randint(0, cfg.vocab_size, (B, T), device="cuda") for _ in range(2)]

    @torch.inference_mode()
    def prefill(p):
        return model(p, use_cache=True).logits[:, -1]

    @torch.inference_mode()
    def generate(p):
        return model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)

    pre = common.time_torch(prefill, [(p,) for p in prompts], reps=reps)
    gen = common.time_torch(generate, [(p,) for p in prompts], reps=max(3, reps // 4), warmup=1)
    return pre, gen


def row(name, impl, cfg, B, T, n, pre, gen, peaks):
    pre_lim, dec_lim, dec_bytes = limits(cfg, B, T, peaks)
    dec = (gen["ms"] - gen.get("first_ms", pre["ms"])) / (n - 1)
    return dict(model=name, impl=impl, B=B, prompt=T, new_tokens=n, prefill_ms=pre["ms"],
                prefill_min_ms=pre["min_ms"], prefill_limit_ms=pre_lim,
                prefill_tok_s=B * T / (pre["ms"] * 1e-3), generate_ms=gen["ms"],
                generate_1_ms=gen.get("first_ms"),
                decode_ms=dec, decode_limit_ms=dec_lim, decode_tok_s=B / (dec * 1e-3),
                decode_gbps=dec_bytes / (dec * 1e-3) / 1e9, compile_prefill_s=pre["first_call_s"],
                compile_generate_s=gen["first_call_s"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="7b,medium", help="7b, medium (and tiny)")
    p.add_argument("--batches", default="1,16", help="comma-separated, e.g. 1,4,16,64")
    p.add_argument("--prompts", default="2048", help="prompt lengths, e.g. 128,2048,32768")
    p.add_argument("--new-tokens", type=int, default=128, help="N of generate (>= 2)")
    p.add_argument("--impls", default="ours,hf",
                   help="ours (tfla_jax, inference_form), ours-built (as built), hf (transformers)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--peak-tbps", type=float)
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test: tiny config, B 1,2, prompt 16, 8 new tokens, ours and "
                        "ours-built")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.prompts, args.new_tokens, args.impls, args.reps = (
            "tiny", "1,2", "16", 8, "ours,ours-built", 3)
    import jax

    info = common.run_info(bench="bench_generate")
    peaks = common.peaks_for(info.get("device"), args.peak_tflops, args.peak_tbps)
    info.update(peak_flops=peaks[0], peak_bytes_per_s=peaks[1])
    print(f"devices: {jax.devices()}", flush=True)
    rows = []
    for name in args.models.split(","):
        cfg = model_config(name)
        for impl in args.impls.split(","):
            for B in (int(b) for b in args.batches.split(",")):
                for T in (int(t) for t in args.prompts.split(",")):
                    try:
                        run = dict(ours=ours, hf=hf, **{"ours-built": functools.partial(
                            ours, built=True)})[impl]
                        pre, gen = run(cfg, B, T, args.new_tokens, args.reps)
                        r = row(name, impl, cfg, B, T, args.new_tokens, pre, gen, peaks)
                    except Exception as e:  # noqa: BLE001 - record (OOM, missing peer), go on
                        traceback.print_exc()
                        r = dict(model=name, impl=impl, B=B, prompt=T, new_tokens=args.new_tokens,
                                 error=f"{type(e).__name__}: {e}"[:2000])
                    gc.collect()  # this case's model and arrays (the next may be another model)
                    if "torch" in sys.modules:
                        sys.modules["torch"].cuda.empty_cache()
                    rows.append(r)
                    common.log_row(r)
                    common.write_results(args.out, "bench_generate", rows, info, COLUMNS,
                                         table=False)
    common.write_results(args.out, "bench_generate", rows, info, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
