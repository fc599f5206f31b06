"""xLSTM against a same-size Llama-style transformer: training tokens/s at T = 2K, 8K, 32K.

The transformer (benchmarks only, never imported by tfla_jax): token embedding; pre-norm blocks
x += Attn(RMSNorm(x)), x += SwiGLU(RMSNorm(x)) with causal multi-head self-attention (q, k, v, o
projections without biases, rotary position embeddings, RoPE theta 500000 as in Llama 3); a final
RMSNorm and an untied LM head. bf16 compute (train_lm's --dtype auto), float32 parameters, blocks
stacked and run with nnx.scan like the xLSTM presets. Attention is
`jax.nn.dot_product_attention(..., is_causal=True)`, cuDNN on GPU, XLA elsewhere.

Same size: the xLSTM block holds 2 d qk + 3 d v + 3 d f (+ gates, norms) = 4 d^2 + 3 d f at the
presets' qk = d/2, v = d; a transformer block of the same d and SwiGLU width f holds 4 d^2 + 3 d f,
so the baseline takes the preset's d, depth and f (heads of 128; 32 in --smoke). medium, 256-byte
vocabulary: xLSTM 304,358,592 parameters, transformer 304,137,216 (-0.07%).

Both models train with examples/train_lm.py's optimizer (make_optimizer at its default flags:
global-norm clip 1.0, AdamW b2 0.95 with weight decay on matrices, warmup + cosine) and loss (mean
next-byte cross-entropy, `xLSTMLM.loss`; the transformer's equivalent), in a single-device jit step
with the state donated and train_lm's NaN guard. Random byte tokens, no document resets (the
transformer has no segment masking either).

Model FLOPs per token (MFU = tokens/s * FLOPs / common.PEAKS; backward = 2 x forward):
  both         6 N, N: parameters without the embedding table (a lookup); the LM head included
  xLSTM        + 3 num_blocks H (4 K V + L (K + V))  (train_lm.model_flops_per_token, chunk L)
  transformer  + 6 num_layers T d  (causal q k^T and p v: 2 x 2 d per visible key forward, T / 2
               keys visible on average; no recomputation charged)

Each (model, T) case runs in its own process (--worker), so peak memory (the allocator's lifetime
peak, None on CPU) is per case and an OOM only fails its row. JSON after every row.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/transformer_baseline.py --out $OUT
    PYTHONPATH=. python benchmarks/transformer_baseline.py --smoke --out /tmp/tb   # CPU, < 2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "examples"))
import common  # noqa: E402  (imports no JAX: the parent process must not take the GPU)

ROW = "ROW "  # prefix of a worker's result line on stdout
COLUMNS = [("model", "model", "{}"), ("params", "params", "{:,}"), ("B", "B", "{}"),
           ("T", "T", "{}"), ("step_ms", "step ms", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"), ("gflop_per_token", "GFLOP/token", "{:.3g}"),
           ("model_tflops", "model TFLOP/s", "{:.1f}"), ("mfu", "MFU", "{:.1%}"),
           ("peak_mem_gb", "peak mem GB", "{:.1f}"), ("compiled_mem_gb", "compiled GB", "{:.1f}"),
           ("remat", "remat", "{}"), ("compile_s", "compile s", "{:.0f}"),
           ("loss", "loss", "{:.3f}"), ("error", "error", "{:.120}")]


# ----------------------------------------------------------------------------------------------
# The transformer
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Llama-style decoder hyper-parameters."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    dtype: object = None
    param_dtype: object = None
    remat: bool = False
    attention: str | None = None  # jax.nn.dot_product_attention's implementation

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_params(self) -> int:
        """2 vocab d (embedding, head) + d + layers (4 d^2 + 3 d f + 2 d)."""
        d, f = self.d_model, self.ffn_dim
        return 2 * self.vocab_size * d + d + self.num_layers * (4 * d * d + 3 * d * f + 2 * d)

    @classmethod
    def matching(cls, xcfg, head_dim: int, attention=None) -> TransformerConfig:
        """The same d, depth, SwiGLU width, vocabulary, dtypes and remat as an xLSTMConfig."""
        import jax.numpy as jnp

        return cls(vocab_size=xcfg.vocab_size, d_model=xcfg.embedding_dim,
                   num_layers=xcfg.num_blocks, num_heads=xcfg.embedding_dim // head_dim,
                   ffn_dim=xcfg.ffn_hidden_dim, norm_eps=xcfg.norm_eps, dtype=xcfg.dtype,
                   param_dtype=xcfg.param_dtype or jnp.float32, remat=xcfg.remat,
                   attention=attention)


def rope_tables(T: int, head_dim: int, theta: float):
    """cos, sin (T, head_dim / 2) float32 of the rotary embedding (RoFormer, Su et al. 2021)."""
    import jax.numpy as jnp

    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotates the two halves of x (B, T, H, D) by the position angles (rotate-half form)."""
    import jax.numpy as jnp

    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def build_transformer_classes():
    """The NNX modules (defined here so that the parent process never imports JAX)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tfla_jax.layers import RMSNorm, small_init_std, wang_init_std

    def linear(cfg, d_in, d_out, std, rngs):
        return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype,
                          kernel_init=nnx.initializers.normal(std), rngs=rngs)

    class Attention(nnx.Module):
        """Causal multi-head self-attention with RoPE; q, k, v, o projections, no biases."""

        def __init__(self, cfg: TransformerConfig, *, rngs):
            d = cfg.d_model
            self.cfg = cfg
            self.q, self.k, self.v = (linear(cfg, d, d, small_init_std(d), rngs)
                                      for _ in range(3))
            self.o = linear(cfg, d, d, wang_init_std(d, cfg.num_layers), rngs)

        def __call__(self, x, cos, sin):
            cfg = self.cfg
            heads = x.shape[:-1] + (cfg.num_heads, cfg.head_dim)
            q = apply_rope(self.q(x).reshape(heads), cos, sin)
            k = apply_rope(self.k(x).reshape(heads), cos, sin)
            v = self.v(x).reshape(heads)
            h = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                             implementation=cfg.attention)
            return self.o(h.reshape(x.shape))

    class SwiGLU(nnx.Module):
        """down(silu(gate(x)) * up(x)) (Shazeer 2020), no biases."""

        def __init__(self, cfg: TransformerConfig, *, rngs):
            d, f = cfg.d_model, cfg.ffn_dim
            self.gate = linear(cfg, d, f, small_init_std(d), rngs)
            self.up = linear(cfg, d, f, small_init_std(d), rngs)
            self.down = linear(cfg, f, d, wang_init_std(d, cfg.num_layers), rngs)

        def __call__(self, x):
            return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

    class Block(nnx.Module):
        """Pre-norm: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

        def __init__(self, cfg: TransformerConfig, *, rngs):
            norm = functools.partial(RMSNorm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype)
            self.attn_norm, self.attn = norm(), Attention(cfg, rngs=rngs)
            self.ffn_norm, self.ffn = norm(), SwiGLU(cfg, rngs=rngs)

        def __call__(self, x, cos, sin):
            x = x + self.attn(self.attn_norm(x), cos, sin)
            return x + self.ffn(self.ffn_norm(x))

    class Transformer(nnx.Module):
        """Embedding, num_layers Blocks (stacked, nnx.scan), final RMSNorm, untied LM head."""

        def __init__(self, cfg: TransformerConfig, *, rngs):
            d = cfg.d_model
            self.cfg = cfg
            self.embed = nnx.Embed(cfg.vocab_size, d, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype,
                                   embedding_init=nnx.initializers.normal(small_init_std(d)),
                                   rngs=rngs)

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs):
                return Block(cfg, rngs=rngs)

            self.blocks = make_blocks(rngs)
            self.final_norm = RMSNorm(d, eps=cfg.norm_eps, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype)
            self.lm_head = nnx.Linear(d, cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype,
                                      preferred_element_type=jnp.float32,
                                      kernel_init=nnx.initializers.normal(small_init_std(d)),
                                      rngs=rngs)

        def __call__(self, tokens):
            """tokens (B, T) -> logits (B, T, vocab) float32."""
            cfg = self.cfg
            cos, sin = rope_tables(tokens.shape[1], cfg.head_dim, cfg.rope_theta)

            def body(x, block):
                return block(x, cos, sin), None

            if cfg.remat:
                body = nnx.remat(body, prevent_cse=False)
            x, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
                self.embed(tokens), self.blocks)
            return self.lm_head(self.final_norm(x)).astype(jnp.float32)

        def loss(self, tokens, targets):
            """Mean next-token cross-entropy (nats), as xLSTMLM.loss."""
            logits = self(tokens)
            lse = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return (lse - picked).mean()

    return Transformer


# ----------------------------------------------------------------------------------------------
# One case (worker process)
# ----------------------------------------------------------------------------------------------

def train_flags(args, T: int, B: int) -> list:
    """train_lm flags: the preset, remat, the shape; everything else at its default."""
    flags = ["--preset", "tiny" if args.smoke else "medium", "--seq-len", str(T),
             "--batch-size", str(B), "--steps", str(args.warmup + args.steps)]
    return flags + (["--remat"] if args.remat else ["--no-remat"])


def xlstm_chunk(cfg, T: int) -> int:
    """The chunk length L the default mLSTM implementation runs with (for the FLOP count)."""
    import jax
    import tfla_jax

    impl = cfg.mlstm_implementation or ("pallas" if jax.default_backend() == "gpu"
                                        else "chunkwise")
    L = common.Tfla(tfla_jax).chunk_used(impl, cfg.qk_head_dim, cfg.v_head_dim, T, cfg.dtype,
                                         "exp", cfg.chunk_size)
    return L or min(256, T)


def run_case(args, model_name: str, T: int) -> dict:
    """Builds one model, compiles its train step, times args.steps steps; returns the row."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import train_lm

    B = args.tokens_per_step // T
    targs = train_lm.build_parser().parse_args(train_flags(args, T, B))
    xcfg = train_lm.build_config(targs)
    gpu = jax.default_backend() == "gpu"
    if model_name == "xlstm":
        cfg = xcfg
        make = functools.partial(train_lm.xLSTMLM, cfg)
        extra_flops = (train_lm.model_flops_per_token(cfg, xlstm_chunk(cfg, T))
                       - 6.0 * (cfg.num_params - cfg.vocab_size * cfg.embedding_dim))
        desc = dict(d=cfg.embedding_dim, blocks=cfg.num_blocks, heads=cfg.num_heads,
                    K=cfg.qk_head_dim, V=cfg.v_head_dim, ffn=cfg.ffn_hidden_dim,
                    chunk=xlstm_chunk(cfg, T))
    else:
        impl = {"auto": "cudnn" if gpu else None, "xla": None}.get(args.attention, args.attention)
        cfg = TransformerConfig.matching(xcfg, 32 if args.smoke else 128, attention=impl)
        make = functools.partial(build_transformer_classes(), cfg)
        extra_flops = 6.0 * cfg.num_layers * T * cfg.d_model
        desc = dict(d=cfg.d_model, blocks=cfg.num_layers, heads=cfg.num_heads, K=cfg.head_dim,
                    ffn=cfg.ffn_dim, attention=impl or "xla")
    abstract = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    params_count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    embed_count = xcfg.vocab_size * xcfg.embedding_dim
    flops_per_token = 6.0 * (params_count - embed_count) + extra_flops
    tx, _ = train_lm.make_optimizer(targs)

    @jax.jit
    def init():
        params = nnx.to_pure_dict(nnx.state(make(rngs=nnx.Rngs(0))))
        return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))

    def loss_of(params, tokens):
        return nnx.merge(graphdef, params).loss(tokens[:, :-1], tokens[:, 1:])

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, tokens):
        loss, grads = jax.value_and_grad(loss_of)(state["params"], tokens)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = dict(params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                   step=state["step"] + 1)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)  # train_lm's guard
        return new, loss

    keys = jax.random.split(jax.random.key(1), 2)
    batches = [jax.random.randint(k, (B, T + 1), 0, xcfg.vocab_size, jnp.int32) for k in keys]
    state = init()
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    compiled_mem = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    for i in range(args.warmup):
        state, loss = jax.block_until_ready(compiled(state, batches[i % 2]))
    ms = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, loss = jax.block_until_ready(compiled(state, batches[i % 2]))
        ms.append(1e3 * (time.perf_counter() - t0))
    step_ms = statistics.median(ms)
    tokens_per_s = B * T / (step_ms * 1e-3)
    peak = common.device_peak_bytes()
    device = jax.devices()[0].device_kind
    peak_flops = common.peaks_for(device, args.peak_tflops)[0] if gpu else None
    return dict(model=model_name, device=device, params=params_count,
                params_m=params_count / 1e6, B=B, T=T, dtype=jnp.dtype(xcfg.dtype).name, **desc,
                remat=bool(args.remat), compile_s=compile_s, steps_timed=args.steps,
                step_ms=step_ms, min_ms=min(ms), tokens_per_s=tokens_per_s,
                flops_per_token=flops_per_token, gflop_per_token=flops_per_token / 1e9,
                model_tflops=tokens_per_s * flops_per_token / 1e12,
                mfu=None if peak_flops is None else tokens_per_s * flops_per_token / peak_flops,
                peak_tflops=None if peak_flops is None else peak_flops / 1e12,
                loss=float(loss), loss_finite=bool(math.isfinite(float(loss))),
                peak_mem_gb=None if peak is None else peak / 1e9,
                compiled_mem_gb=None if compiled_mem is None else compiled_mem / 1e9)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def worker_argv(args, model: str, T: int) -> list:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", f"{model}:{T}",
            "--tokens-per-step", str(args.tokens_per_step), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--attention", args.attention]
    argv += ["--remat"] if args.remat else []
    argv += ["--smoke"] if args.smoke else []
    return argv + (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])


def run_worker(args, model: str, T: int) -> dict:
    """One case in a subprocess; its row, or a row with the error."""
    base = dict(model=model, T=T, B=args.tokens_per_step // T, remat=bool(args.remat))
    try:
        proc = subprocess.run(worker_argv(args, model, T), capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(base, error=f"timed out after {args.timeout} s")
    rows = [line[len(ROW):] for line in proc.stdout.splitlines() if line.startswith(ROW)]
    if rows:
        return json.loads(rows[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(base, error=f"exit {proc.returncode}: " + " / ".join(tail))


def side_by_side(rows) -> str:
    """T | xLSTM tokens/s | transformer tokens/s | ratio."""
    by = {(r["model"], r["T"]): r.get("tokens_per_s") for r in rows}
    lines = ["| T | B | xLSTM tokens/s | transformer tokens/s | xLSTM / transformer |",
             "|---:|---:|---:|---:|---:|"]
    for T in sorted({r["T"] for r in rows}):
        x, t = by.get(("xlstm", T)), by.get(("transformer", T))
        fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
        ratio = f"{x / t:.2f}" if x and t else "-"
        B = next(r["B"] for r in rows if r["T"] == T)
        lines.append(f"| {T} | {B} | {fmt(x)} | {fmt(t)} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="2048,8192,32768", help="comma-separated T")
    p.add_argument("--tokens-per-step", type=int, default=32768, help="B = this / T")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--models", default="xlstm,transformer", help="of xlstm, transformer")
    p.add_argument("--remat", action="store_true", help="recompute each block (both models)")
    p.add_argument("--attention", default="auto", choices=("auto", "cudnn", "xla"),
                   help="transformer attention; auto: cudnn on GPU, xla elsewhere")
    p.add_argument("--smoke", action="store_true",
                   help="CPU test: tiny preset, T = 64, 128 at 256 tokens per step, 2 steps")
    p.add_argument("--timeout", type=int, default=300, help="seconds per case")
    p.add_argument("--peak-tflops", type=float, help="default: common.PEAKS by device")
    p.add_argument("--out", default=os.environ.get("OUT", "."),
                   help="directory for transformer_baseline.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # MODEL:T, one case in this process
    args = p.parse_args(argv)
    if args.smoke:
        defaults = dict(seq_lens="2048,8192,32768", tokens_per_step=32768, steps=10, warmup=3)
        smoke = dict(seq_lens="64,128", tokens_per_step=256, steps=2, warmup=1)
        for name, value in smoke.items():  # smoke values unless given explicitly
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
    if args.worker:
        model, T = args.worker.split(":")
        if args.smoke:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        try:
            row = run_case(args, model, int(T))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported in the row
            traceback.print_exc()
            row = dict(model=model, T=int(T), B=args.tokens_per_step // int(T),
                       remat=bool(args.remat), error=f"{type(e).__name__}: {e}"[:400])
        print(ROW + json.dumps(row, default=str), flush=True)
        return row
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    models = args.models.split(",")
    for T in seq_lens:
        if args.tokens_per_step % T:
            p.error(f"--tokens-per-step {args.tokens_per_step} is not a multiple of T = {T}")
    info = common.run_info(script="transformer_baseline.py", flags=vars(args))
    rows = []
    for T in seq_lens:
        for model in models:
            t0 = time.perf_counter()
            row = run_worker(args, model, T)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            common.log_row(row)
            if "device" in row:
                info.setdefault("device", row["device"])
            common.write_results(args.out, "transformer_baseline", rows, info, COLUMNS,
                                 table=False)
    counts = {r["model"]: r["params"] for r in rows if "params" in r}
    if counts:
        print("parameters: " + ", ".join(f"{m} {n:,}" for m, n in counts.items())
              + (f" (transformer / xLSTM = {counts['transformer'] / counts['xlstm']:.4f})"
                 if len(counts) == 2 else ""))
    common.write_results(args.out, "transformer_baseline", rows, info, COLUMNS)
    print("\n" + side_by_side(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
