"""Train a byte-level xLSTM language model (`tfla_jax.layers.xLSTMLM`) on real text, CPU or GPU.

    python examples/train_lm.py                       # tiny model, Python stdlib sources, CPU ~2 min
    python examples/train_lm.py --resume              # continue the newest run exactly
    python examples/train_lm.py --data notes.txt src/ # your own UTF-8 text files / directories
    python examples/train_lm.py --preset small --seq-len 1024 --batch-size 64 --steps 5000   # a GPU

One optimizer step (`make_train_step`):
  1. the global batch [grad_accum, micro_batch, seq_len + 1] is split over the devices of a
     ("data", "fsdp") mesh (with --context-parallel N also a "context" axis of N devices that
     splits each sequence into N blocks: `tfla_jax.mlstm(..., context_axis="context")`); inside
     `jax.shard_map` each device all-gathers the parameters that FSDP shards, runs forward +
     backward on its rows (micro-batches in a `lax.scan`), and the gradients are averaged over
     devices (`psum_scatter` back onto the FSDP shards, `psum` elsewhere);
  2. optax: global-norm clipping, AdamW (b2 0.95, weight decay on matrices only), warmup + cosine;
  3. a NaN/inf guard: a step whose loss or gradient norm is not finite leaves the state untouched,
     and the host stops with a message; the last checkpoint (always a finite state) stays.
Parameters and optimizer state are float32; the model computes in bfloat16 on GPU (--dtype).

Each run has a directory (--out-dir; default a new runs/lm/<date-time>) holding config.json,
metrics.jsonl (train and validation records), loss.png (bits per byte), checkpoints/<step>/ (orbax:
parameters, optimizer state, step, RNG, data position) and sample.txt (text generated at the end).
--resume continues from the newest checkpoint that restores: a damaged newer one is named in a
warning and moved to broken-checkpoints/; a partial last record of metrics.jsonl is dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import io
import json
import math
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lm_data next to this file

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import lm_data  # noqa: E402
import tfla_jax  # noqa: E402
from tfla_jax.layers import REMAT_POLICIES, generate, xLSTMConfig, xLSTMLM  # noqa: E402

PRESETS = ("tiny", "small", "medium", "large")  # xLSTMConfig presets, here with the 256-byte vocabulary
BATCH_AXES = ("data", "fsdp")  # the batch is split over both mesh axes; FSDP shards over "fsdp"
CONTEXT_AXIS = "context"  # --context-parallel N > 1: each sequence is split over this axis
LN2 = math.log(2.0)
RUNS_DIR = os.path.join("runs", "lm")  # default home of the runs, one directory each
# Flags whose change makes a resumed run a different run (checked against the checkpoint).
RUN_DEFINING = ("data", "max_corpus_bytes", "val_fraction", "seq_len", "batch_size", "seed",
                "preset", "embedding_dim", "num_blocks", "num_heads", "chunk_size", "dtype", "lr",
                "min_lr_ratio", "warmup_steps", "weight_decay", "clip_norm", "b1", "b2",
                "no_document_resets", "scan_blocks")


class UsageError(ValueError):
    """A flag value or combination that cannot work; raised before anything is compiled."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last checkpoint holds the last good state."""


class CheckpointError(RuntimeError):
    """--resume found checkpoints, none of them intact (each is named with what is wrong)."""


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults, but not the empty ones
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_lm.py", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help="UTF-8 text files or directories (default: the running Python's stdlib .py "
                        "sources)")
    g.add_argument("--max-corpus-bytes", type=int, default=lm_data.DEFAULT_MAX_BYTES,
                   help="read at most this many bytes of text (keeps start-up fast)")
    g.add_argument("--val-fraction", type=float, default=lm_data.DEFAULT_VAL_FRACTION,
                   help="fraction of files (of bytes, for a single file) held out for validation")
    g.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per training sequence")
    g.add_argument("--batch-size", type=int, default=32,
                   help="sequences per optimizer step (all devices, all accumulation steps)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="split each batch into this many sequential micro-batches")
    g.add_argument("--seed", type=int, default=0, help="parameter init, data order and sampling")
    g.add_argument("--no-document-resets", action="store_true",
                   help="read the packed documents of a window as one text (by default the "
                        "mLSTM state restarts at every document: segment_ids)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=PRESETS, default="tiny",
                   help="xLSTMConfig preset: tiny (CPU), small / medium / large (~1.2B, GPU)")
    g.add_argument("--embedding-dim", type=int, help="override the preset's width")
    g.add_argument("--num-blocks", type=int, help="override the preset's depth")
    g.add_argument("--num-heads", type=int, help="override the preset's mLSTM heads")
    g.add_argument("--chunk-size", type=int, help="mLSTM chunk size (power of two)")
    g.add_argument("--scan-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="run the blocks as one lax.scan over stacked parameters (one block "
                        "compiled) or, with --no-scan-blocks, as a Python loop (longer compile; "
                        "no per-iteration slices of stacked weights and residuals); default: "
                        "the preset's (medium, large: scanned)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (parameters stay float32); auto: bfloat16 on GPU/TPU, "
                        "float32 on CPU")
    g.add_argument("--mlstm-implementation", default="auto",
                   choices=("auto", *tfla_jax.implementations()),
                   help="tfla_jax.mlstm implementation; auto: the fastest kernel backend on GPU, "
                        "chunkwise else")
    g.add_argument("--loss-chunk", type=int, default=0, metavar="POSITIONS",
                   help="form the logits and the loss this many positions at a time "
                        "(rematerialised; xLSTMLM.loss): the (B, T, vocab) float32 logits never "
                        "exist at once; 0: all positions (a divisor of --seq-len)")
    g.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in the backward pass; default: on GPU/TPU (the "
                        "medium preset on an H200: 10x less memory and 12%% faster), off on CPU")
    g.add_argument("--remat-policy", choices=tuple(REMAT_POLICIES), default="dots_cell",
                   help="with --remat, what a block keeps for the backward (xLSTMConfig."
                        "remat_policy): dots_cell = its matmul and mLSTM kernel outputs (the "
                        "medium preset on an H200: 45.4%% MFU in 22.8 GB), dots = its matmul "
                        "outputs (the mLSTM forward runs twice), full = its input only")
    g = p.add_argument_group("optimizer")
    g.add_argument("--steps", type=int, default=600, help="optimizer steps of the whole run")
    g.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    g.add_argument("--warmup-steps", type=int, default=50, help="linear warmup from 0")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW, on matrices only")
    g.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
    g.add_argument("--b1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--b2", type=float, default=0.95, help="AdamW beta2")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=100, help="validate every this many steps")
    g.add_argument("--eval-batches", type=int, default=16,
                   help="validation set size, in batches of --batch-size sequences")
    g.add_argument("--log-every", type=int, default=10, help="metrics record every this many steps")
    g.add_argument("--out-dir", help="directory of the run's metrics, plot, checkpoints and "
                   f"sample (default: a new {RUNS_DIR}/<date-time>; with --resume the newest)")
    g.add_argument("--ckpt-every", type=int, default=300, help="checkpoint every this many steps")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out-dir (exactly)")
    g.add_argument("--overwrite", action="store_true", help="start over, deleting an earlier run")
    g.add_argument("--stop-at", type=int, metavar="STEP",
                   help="checkpoint and stop after this step (continue later with --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--nan-at-step", type=int, default=-1, metavar="STEP",
                   help="testing: make the loss NaN at this step to exercise the guard")
    g = p.add_argument_group("devices")
    g.add_argument("--devices", type=int, default=0, help="devices to use (0: all)")
    g.add_argument("--fsdp", type=int, default=1,
                   help="shard parameters and optimizer state over this many devices (the rest "
                        "of the devices replicate them: data parallelism)")
    g.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="split each sequence into N blocks over N devices (a 'context' mesh axis "
                        "next to data and fsdp; the mLSTM state crosses the blocks exactly)")
    g = p.add_argument_group("sample")
    g.add_argument("--sample-tokens", type=int, default=400, help="bytes to generate at the end")
    g.add_argument("--prompt", default="def ", help="text the sample continues")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes")
    return p


def validate_args(args) -> None:
    """Flag values that cannot work, with the flag named; runs before any data or compilation."""
    def positive(name, value, minimum=1):
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')}: expected an integer >= {minimum}, "
                             f"got {value}")
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches",
                 "log_every", "ckpt_every", "keep_checkpoints", "fsdp", "context_parallel",
                 "max_corpus_bytes",
                 "embedding_dim", "num_blocks", "num_heads"):
        positive(name, getattr(args, name))
    positive("warmup_steps", args.warmup_steps, 0)
    positive("sample_tokens", args.sample_tokens, 0)
    positive("devices", args.devices, 0)
    positive("loss_chunk", args.loss_chunk, 0)
    if args.loss_chunk and args.seq_len % args.loss_chunk:
        raise UsageError(f"--loss-chunk {args.loss_chunk} does not divide --seq-len "
                         f"{args.seq_len}")

    def number(name, low, high=math.inf, low_open=False, high_open=False):
        """A finite float flag in [low, high] (either end open); NaN and inf fail every check."""
        value = getattr(args, name)
        if (math.isfinite(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high)):
            return
        if math.isinf(high):
            expected = f"{'>' if low_open else '>='} {low:g}"
        else:
            expected = (f"in {'(' if low_open else '['}{low:g}, {high:g}"
                        f"{')' if high_open else ']'}")
        raise UsageError(f"--{name.replace('_', '-')}: expected a finite number {expected}, "
                         f"got {value}")
    number("val_fraction", 0, 1, low_open=True, high_open=True)
    number("lr", 0, low_open=True)
    number("clip_norm", 0, low_open=True)
    number("min_lr_ratio", 0, 1)
    number("weight_decay", 0)
    number("b1", 0, 1, high_open=True)
    number("b2", 0, 1, high_open=True)
    number("temperature", 0)
    if args.top_k is not None and not 1 <= args.top_k <= 256:
        raise UsageError(f"--top-k: expected an integer in [1, 256], got {args.top_k}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise UsageError(f"--stop-at: expected a step in [1, --steps={args.steps}], "
                         f"got {args.stop_at}")
    if args.seq_len % args.context_parallel:
        raise UsageError(f"--seq-len {args.seq_len} is not divisible by --context-parallel "
                         f"{args.context_parallel}")
    if args.batch_size % args.grad_accum:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by --grad-accum "
                         f"{args.grad_accum}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.out_dir:
        check_out_dir(args.out_dir)
    if (args.mlstm_implementation in ("pallas", *tfla_jax.available_backends())
            and jax.default_backend() != "gpu"):
        raise UsageError(f"--mlstm-implementation {args.mlstm_implementation} needs a GPU; this is "
                         f"{jax.default_backend()!r} (use auto or chunkwise)")


def check_out_dir(out_dir: str) -> None:
    """--out-dir must be a directory or creatable as one (no file in the way, writable)."""
    path = os.path.abspath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out-dir: {out_dir!r} is a file, not a directory; name a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out-dir: cannot create {out_dir!r}: {parent!r} is a file, not a "
                         "directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir: cannot write {out_dir!r}: {parent!r} is not writable")


def compute_dtype(args):
    if args.dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(args.dtype)


def use_remat(args) -> bool:
    if args.remat is None:
        # Measured (benchmarks/README.md): without it the activations are written and read back
        # through HBM, which costs more than recomputing them.
        return jax.default_backend() in ("gpu", "tpu")
    return args.remat


def build_config(args) -> xLSTMConfig:
    """The model config: a preset with the byte vocabulary and the flags' overrides."""
    overrides = dict(vocab_size=lm_data.VOCAB_SIZE, dtype=compute_dtype(args),
                     param_dtype=jnp.float32, remat=use_remat(args),
                     remat_policy=args.remat_policy,
                     mlstm_implementation=None if args.mlstm_implementation == "auto"
                     else args.mlstm_implementation)
    for name in ("embedding_dim", "num_blocks", "num_heads", "chunk_size", "scan_blocks"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    preset = getattr(xLSTMConfig, args.preset)
    try:
        widths = preset(**{**overrides, "num_heads": 1})  # the widths do not depend on the heads
    except ValueError as e:  # the config's own checks (e.g. a chunk size that is no power of two)
        raise UsageError(f"model config: {e}") from None
    heads = overrides.get("num_heads") or preset().num_heads
    for name, width in (("q/k", widths.qk_dim), ("v", widths.v_dim)):
        if width % heads:
            raise UsageError(f"--num-heads {heads} does not divide the mLSTM {name} width {width} "
                             f"(embedding dim {widths.embedding_dim}); use a divisor of "
                             f"{math.gcd(widths.qk_dim, widths.v_dim)}")
    return preset(**overrides)


# ------------------------------------------------------------------------------------------------
# Mesh and sharding
# ------------------------------------------------------------------------------------------------


def build_mesh(args) -> Mesh:
    """A (data, fsdp) mesh over the first --devices devices; (data, fsdp, context) with
    --context-parallel N > 1 (a sequence's N blocks on neighbouring devices)."""
    available = jax.devices()
    n = args.devices or len(available)
    if n > len(available):
        raise UsageError(f"--devices {n}: only {len(available)} {jax.default_backend()} device(s) "
                         "visible (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "simulates N)")
    cp = args.context_parallel
    if n % (args.fsdp * cp):
        raise UsageError(f"--fsdp {args.fsdp} x --context-parallel {cp} does not divide the {n} "
                         "devices")
    micro = args.batch_size // args.grad_accum
    if micro % (n // cp):
        raise UsageError(f"the micro-batch (--batch-size / --grad-accum = {micro}) is not "
                         f"divisible by the {n // cp} devices that split the batch")
    if cp == 1:
        return Mesh(np.asarray(available[:n]).reshape(n // args.fsdp, args.fsdp), BATCH_AXES)
    devices = np.asarray(available[:n]).reshape(n // (args.fsdp * cp), args.fsdp, cp)
    return Mesh(devices, BATCH_AXES + (CONTEXT_AXIS,))


def context_axis(mesh: Mesh) -> str | None:
    """The mesh axis sequences are split over, or None (no context parallelism)."""
    return CONTEXT_AXIS if CONTEXT_AXIS in mesh.axis_names else None


def token_spec(mesh: Mesh, leading: int = 0) -> P:
    """[..., rows, T] arrays: rows over the batch axes, T over the context axis if any."""
    return P(*([None] * leading), BATCH_AXES, context_axis(mesh))


def fsdp_dim(shape, fsdp: int) -> int:
    """The axis FSDP shards an array along: its largest axis divisible by fsdp; -1: replicate.
    A rule of the shape alone, so the optimizer moments get the layout of their parameters."""
    if fsdp == 1:
        return -1
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[d] % fsdp == 0:
            return d
    return -1


def dim_spec(ndim: int, d: int) -> P:
    return P() if d < 0 else P(*(["fsdp" if i == d else None for i in range(ndim)]))


def tree_specs(tree, fsdp: int):
    """PartitionSpecs for every array of a tree (parameters or optimizer state)."""
    return jax.tree.map(lambda x: dim_spec(len(x.shape), fsdp_dim(x.shape, fsdp)), tree)


# ------------------------------------------------------------------------------------------------
# Optimizer, train and eval steps
# ------------------------------------------------------------------------------------------------


def make_optimizer(args):
    """Clip the global norm, then AdamW with weight decay on matrices only, warmup + cosine."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=args.lr, warmup_steps=args.warmup_steps,
        decay_steps=max(args.steps, args.warmup_steps + 1), end_value=args.lr * args.min_lr_ratio)

    def decay_mask(params):  # Linear kernels and the embedding; not norms' weights, not biases
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)

    tx = optax.chain(optax.clip_by_global_norm(args.clip_norm),
                     optax.adamw(schedule, b1=args.b1, b2=args.b2,
                                 weight_decay=args.weight_decay, mask=decay_mask))
    return tx, schedule


def document_ids(tokens):
    """Segment ids of packed documents, [..., T] int32: an EOD byte ends a document and starts the
    next one's context (the state restarts there; its target is the next document's first byte)."""
    return jnp.cumsum(tokens == lm_data.EOD, axis=-1, dtype=jnp.int32)


def split_windows(tokens, document_resets=True):
    """Windows [..., T + 1] -> (inputs, targets, segment ids or None), each [..., T]: formed on
    whole windows (before T is split over devices), so the ids count documents from the start."""
    inputs = tokens[..., :-1]
    return inputs, tokens[..., 1:], document_ids(inputs) if document_resets else None


def window_loss(graphdef, params, inputs, targets, ids=None, context=None, loss_chunk=None):
    """Mean next-byte cross-entropy (nats) over these positions. inputs, targets, ids [b, T]
    (ids: packed documents, each read on its own; None: one continuous text). context: the mesh
    axis T is split over (inside shard_map), or None. loss_chunk: `xLSTMLM.loss`'s chunk."""
    model = nnx.merge(graphdef, params)
    return model.loss(inputs, targets, chunk=loss_chunk or None, segment_ids=ids,
                      context_axis=context)


def loss_fn(graphdef, params, tokens, document_resets=True):
    """Mean next-byte cross-entropy (nats). tokens [b, T + 1] int32. With document_resets every
    document in the window is read on its own (segment_ids); without, as one continuous text."""
    return window_loss(graphdef, params, *split_windows(tokens, document_resets))


def _gather(params, dims):
    """FSDP: all-gather each sharded parameter (inside shard_map)."""
    return jax.tree.map(lambda x, d: x if d < 0 else lax.all_gather(x, "fsdp", axis=d, tiled=True),
                        params, dims)


def _average_grads(grads, dims, count: int, axes=BATCH_AXES):
    """Sum the per-device gradients (onto the FSDP shards where sharded) over the mesh axes and
    divide by count."""
    others = tuple(a for a in axes if a != "fsdp")

    def reduce(g, d):
        if d >= 0:
            g = lax.psum_scatter(g, "fsdp", scatter_dimension=d, tiled=True)
            return lax.psum(g, others) / count
        return lax.psum(g, axes) / count
    return jax.tree.map(reduce, grads, dims)


def step_options(args) -> dict:
    """make_train_step's keyword options from the flags."""
    return dict(nan_at_step=args.nan_at_step, document_resets=not args.no_document_resets,
                loss_chunk=args.loss_chunk or None)


def make_train_step(graphdef, tx, schedule, mesh, param_dims, param_specs, state_shardings,
                    nan_at_step=-1, document_resets=True, loss_chunk=None):
    """The jit-compiled step: (state, tokens [accum, micro, T + 1]) -> (state, metrics).
    Every device holds as many positions, so the mean over devices is the global mean."""
    num_devices = mesh.size
    axes, context = mesh.axis_names, context_axis(mesh)

    def local_loss_and_grads(params_shard, windows, step):
        params = _gather(params_shard, param_dims)

        def micro_batch(carry, xs):  # gradient accumulation: one micro-batch per scan step
            loss_of = functools.partial(window_loss, graphdef, context=context,
                                        loss_chunk=loss_chunk)
            loss, grads = jax.value_and_grad(loss_of)(params, *xs)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = lax.scan(micro_batch, zeros, windows)
        count = windows[0].shape[0] * num_devices
        loss = lax.psum(loss, axes) / count
        loss = jnp.where(step + 1 == nan_at_step, jnp.nan, loss)  # testing the guard (off: -1)
        return loss, _average_grads(grads, param_dims, count, axes)

    spec = token_spec(mesh, leading=1)
    sharded = jax.shard_map(local_loss_and_grads, mesh=mesh,
                            in_specs=(param_specs, (spec, spec, spec if document_resets else None),
                                      P()),
                            out_specs=(P(), param_specs), check_vma=False)

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_shardings, None))
    def train_step(state, tokens):
        loss, grads = sharded(state["params"], split_windows(tokens, document_resets),
                              state["step"])
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = dict(state, params=optax.apply_updates(state["params"], updates),
                   opt_state=opt_state, step=state["step"] + 1)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)  # NaN guard
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite)
        return new, metrics

    return train_step


def make_eval_step(graphdef, mesh, param_dims, param_specs, document_resets=True,
                   loss_chunk=None):
    """The jit-compiled validation loss (nats per byte) of one batch [b, T + 1]."""
    context = context_axis(mesh)

    def local_loss(params_shard, windows):
        loss = window_loss(graphdef, _gather(params_shard, param_dims), *windows,
                           context=context, loss_chunk=loss_chunk)
        return lax.pmean(loss, mesh.axis_names)

    spec = token_spec(mesh)
    sharded = jax.shard_map(local_loss, mesh=mesh,
                            in_specs=(param_specs, (spec, spec, spec if document_resets else None)),
                            out_specs=P(), check_vma=False)
    return jax.jit(lambda params, tokens: sharded(params, split_windows(tokens, document_resets)))


# ------------------------------------------------------------------------------------------------
# FLOPs (for tokens/s -> model FLOP utilisation)
# ------------------------------------------------------------------------------------------------


def model_flops_per_token(cfg: xLSTMConfig, chunk_size: int) -> float:
    """Training FLOPs per token: 6 N (N: parameters without the embedding table; every weight
    does a multiply-add forward and two backward) plus the mLSTM cell's matrix-memory work,
    3 x forward per block and head: 4 K V (chunk states k v^T and the read-out q C) + L (K + V)
    (the causal, attention-like q k^T and (q k^T) v inside chunks of L)."""
    n = cfg.num_params - cfg.vocab_size * cfg.embedding_dim
    K, V, H = cfg.qk_head_dim, cfg.v_head_dim, cfg.num_heads
    cell = 3 * cfg.num_blocks * H * (4 * K * V + chunk_size * (K + V))
    return 6.0 * n + cell


# ------------------------------------------------------------------------------------------------
# The run: data, model state, checkpoints, metrics
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything built from the flags (data and shapes only; nothing compiled yet)."""

    args: argparse.Namespace
    cfg: xLSTMConfig
    mesh: Mesh
    corpus: lm_data.Corpus
    batches: lm_data.PackedBatches
    val_windows: np.ndarray  # [eval_batches, micro, T + 1]
    graphdef: object
    abstract_params: dict
    tx: optax.GradientTransformation
    schedule: object
    param_dims: dict
    param_specs: dict
    state_shardings: dict
    batch_sharding: NamedSharding

    @property
    def micro_batch(self) -> int:
        return self.args.batch_size // self.args.grad_accum

    def batch(self) -> jax.Array:
        """The next global batch on the devices: [grad_accum, micro, T + 1] int32."""
        a = self.args
        tokens = next(self.batches).reshape(a.grad_accum, self.micro_batch, a.seq_len + 1)
        return jax.device_put(tokens, self.batch_sharding)

    def init_state(self) -> dict:
        """Fresh parameters (xLSTM 7B init), optimizer state, step 0 and an RNG key, sharded."""
        cfg, tx, seed = self.cfg, self.tx, self.args.seed

        @functools.partial(jax.jit, out_shardings=self.state_shardings)
        def init():
            params = nnx.to_pure_dict(nnx.state(xLSTMLM(cfg, rngs=nnx.Rngs(seed))))
            return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                        rng=jax.random.key_data(jax.random.key(seed + 1)))
        return init()

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state (the orbax restore target)."""
        shapes = jax.eval_shape(self.init_state)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)


def setup(args) -> Run:
    """Validates flags, builds config, mesh and data; raises UsageError / DataError early."""
    validate_args(args)
    cfg = build_config(args)
    mesh = build_mesh(args)
    if args.data:
        corpus = lm_data.load_text_files(args.data, args.max_corpus_bytes, args.val_fraction)
    else:
        corpus = lm_data.load_stdlib_corpus(args.max_corpus_bytes, args.val_fraction)
    if corpus.train.size < args.seq_len + 1:
        raise lm_data.DataError(f"{corpus.summary()}: the training text is shorter than one "
                                f"sequence (--seq-len {args.seq_len} + 1 bytes)")
    batches = lm_data.PackedBatches(corpus.train, args.seq_len, args.batch_size, args.seed)
    micro = args.batch_size // args.grad_accum
    # The validation set: eval_batches x batch_size sequences, run in micro-batches; at most as
    # many batches as cover the validation text once (more would only repeat it).
    eval_batches = args.eval_batches
    if corpus.val.size >= args.seq_len + 1:
        held = (corpus.val.size - 1) // args.seq_len
        most = -(-held // args.batch_size)
        if eval_batches > most:
            print(f"note: --eval-batches {eval_batches} asks for {eval_batches * args.batch_size:,} "
                  f"validation sequences, the validation text holds {held:,} of {args.seq_len} "
                  f"bytes; using --eval-batches {most} (all of it)")
            eval_batches = most
    val_windows = lm_data.eval_windows(corpus.val, args.seq_len, micro,
                                       eval_batches * args.grad_accum)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: xLSTMLM(cfg, rngs=nnx.Rngs(0))))
    abstract_params = nnx.to_pure_dict(abstract)
    tx, schedule = make_optimizer(args)
    param_dims = jax.tree.map(lambda x: fsdp_dim(x.shape, args.fsdp), abstract_params)
    param_specs = tree_specs(abstract_params, args.fsdp)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    specs = dict(params=param_specs, opt_state=tree_specs(abstract_opt, args.fsdp), step=P(),
                 rng=P())
    state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                   is_leaf=lambda x: isinstance(x, P))
    batch_sharding = NamedSharding(mesh, P(None, BATCH_AXES))
    return Run(args, cfg, mesh, corpus, batches, val_windows, graphdef, abstract_params, tx,
               schedule, param_dims, param_specs, state_shardings, batch_sharding)


class Checkpoints:
    """orbax checkpoints in <out-dir>/checkpoints/<step>: the state pytree (parameters,
    optimizer, step, RNG) and a JSON item (data position, the run-defining flags)."""

    def __init__(self, directory: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp, self.directory = ocp, os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        args = self.ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state),
                                                    meta=args.JsonSave(meta)))

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=self.ocp.args.Composite(
            meta=self.ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        args = self.ocp.args
        out = self.manager.restore(step, args=args.Composite(
            state=args.StandardRestore(abstract_state), meta=args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def visible_damage(self, step: int) -> str | None:
        """What is missing or unreadable in checkpoint `step` on a look at its files (None: nothing
        seen; a damaged array file shows only when restored)."""
        d = os.path.join(self.directory, str(step))
        for item in ("meta", "state"):
            if not os.path.isdir(os.path.join(d, item)):
                return f"its {item}/ folder is missing"
        for path in [os.path.join(d, "meta", "metadata"), os.path.join(d, "state", "_METADATA")]:
            try:
                with open(path) as fh:
                    content = json.load(fh)
            except (OSError, ValueError) as e:
                return f"{os.path.relpath(path, d)} is unreadable ({type(e).__name__}: {e})"
            if path.endswith("metadata") and not (isinstance(content, dict)
                                                  and {"data", "flags", "steps"} <= set(content)):
                return "meta/metadata lacks the data position, flags or steps"
        for shard in glob.glob(os.path.join(d, "state", "ocdbt.process_*")):
            for manifest in (os.path.join(d, "state"), shard):
                if not os.path.isfile(os.path.join(manifest, "manifest.ocdbt")):
                    return f"{os.path.relpath(manifest, d)}/manifest.ocdbt is missing"
        return None

    @staticmethod
    def _attempt(restore):
        """(restore(), None), or (None, what went wrong). After a failed restore, tensorstore's
        reads still in flight report onto orbax's closed event loop, a traceback each
        ("Event loop is closed"); they are swallowed here, waiting for them to settle."""
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            try:
                return restore(), None
            except Exception as e:  # noqa: BLE001 -- any failure means: not restorable
                seen, deadline = -1, time.monotonic() + 3.0
                while time.monotonic() < deadline and len(buf.getvalue()) != seen:
                    seen = len(buf.getvalue())
                    time.sleep(0.2)
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                message = message.split(" See full TensorStore details")[0]
                return None, f"{type(e).__name__}: {message[:300]}"

    def restore_newest_intact(self, abstract_state: dict, check_meta) -> tuple[int, dict, dict]:
        """The newest checkpoint that restores (step, state, meta). A damaged newer one is named in
        a warning and moved to <out-dir>/broken-checkpoints/ (so this run can write that step
        again); none intact: CheckpointError naming each. check_meta(meta) runs before the
        state is read (a flag mismatch is the user's, not damage: its UsageError goes through)."""
        broken = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            reason = self.visible_damage(step)
            meta = state = None
            if reason is None:
                meta, reason = self._attempt(lambda: self.restore_meta(step))
            if reason is None:
                check_meta(meta)
                out, reason = self._attempt(lambda: self.restore(step, abstract_state))
                if reason is None:
                    state, meta = out
            if reason is not None:
                broken.append((step, reason))
                continue
            if broken:
                self._set_aside(broken, step)
            return step, state, meta
        raise CheckpointError(
            f"--resume: no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {s} is damaged ({r})" for s, r in broken)
            + ". Start over with --overwrite (or another --out-dir)")

    def _set_aside(self, broken, step) -> None:
        aside = os.path.join(os.path.dirname(self.directory), "broken-checkpoints")
        os.makedirs(aside, exist_ok=True)
        for s, reason in broken:
            target, n = os.path.join(aside, str(s)), 1
            while os.path.exists(target):
                target, n = os.path.join(aside, f"{s}-{n}"), n + 1
            shutil.move(os.path.join(self.directory, str(s)), target)
            print(f"warning: checkpoint {self.directory}/{s} is damaged ({reason}); skipped it "
                  f"(moved to {target}) and resume from step {step}", file=sys.stderr)
        self.manager.reload()


def _has_checkpoint(run_dir: str) -> bool:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


def resolve_out_dir(args) -> str:
    """--out-dir, else a new runs/lm/<date-time> (fresh run) or the newest one (--resume)."""
    if args.out_dir:
        return args.out_dir
    if args.resume:
        runs = sorted(d for d in (os.listdir(RUNS_DIR) if os.path.isdir(RUNS_DIR) else [])
                      if _has_checkpoint(os.path.join(RUNS_DIR, d)))  # date-time names sort in time
        if not runs:
            raise UsageError(f"--resume: no run with a checkpoint in {RUNS_DIR}/; start a run "
                             "without --resume, or name one with --out-dir")
        return os.path.join(RUNS_DIR, runs[-1])
    base = os.path.join(RUNS_DIR, time.strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


def run_flags(args) -> dict:
    return {name: getattr(args, name) for name in RUN_DEFINING}


def check_resume_flags(saved: dict, args) -> None:
    """A resumed run must be the same run: the data, model and optimizer flags must match."""
    now = run_flags(args)
    diff = [f"--{k.replace('_', '-')} {now[k]!r} (checkpoint: {saved.get(k)!r})"
            for k in RUN_DEFINING if saved.get(k) != now[k]]
    if diff:
        raise UsageError("--resume: these flags differ from the checkpointed run: " + "; ".join(diff))


class Metrics:
    """metrics.jsonl: one JSON record per line, {"split": "train" | "val", "step": ..., ...}."""

    def __init__(self, path: str, keep_until_step: int | None):
        self.path = path
        self.records = []
        if keep_until_step is not None and os.path.exists(path):  # resume: drop what came after
            self.records = [r for r in self._read(path) if r["step"] <= keep_until_step]
        tmp = path + ".tmp"  # a kill while rewriting leaves the old file whole
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(tmp, path)

    @staticmethod
    def _read(path: str) -> list[dict]:
        """The records of a metrics file; a partial line (a kill during an append) is dropped."""
        records, bad = [], []
        with open(path) as fh:
            for number, line in enumerate(fh, 1):
                try:
                    record = json.loads(line)
                    if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                        raise ValueError("not a metrics record")
                except ValueError:
                    if line.strip():
                        bad.append(number)
                    continue
                records.append(record)
        if bad:
            print(f"warning: {path}: dropped {len(bad)} partial or unreadable record(s) (line "
                  f"{', '.join(map(str, bad))}), e.g. what a kill during a write leaves",
                  file=sys.stderr)
        return records

    def add(self, **record) -> None:
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def split(self, name: str) -> list[dict]:
        return [r for r in self.records if r["split"] == name]


def plot_metrics(metrics: Metrics, path: str, title: str) -> None:
    """loss.png: train and validation bits per byte against the step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = metrics.split("train"), metrics.split("val")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["bpb"] for r in train], label="train", lw=1.2)
    if val:
        ax.plot([r["step"] for r in val], [r["bpb"] for r in val], "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(eval_step, params, val_batches) -> float:
    """Mean validation loss (nats per byte) over the fixed validation batches."""
    return float(np.mean(jax.device_get([eval_step(params, batch) for batch in val_batches])))


def sample_text(run: Run, params, rng_data, args) -> str:
    """Continue --prompt by --sample-tokens bytes with the trained model (prefill + decode)."""
    device = jax.devices()[0]
    params = jax.device_put(jax.device_get(params), device)
    model = nnx.merge(run.graphdef, params)
    prompt = np.frombuffer(args.prompt.encode("utf-8") or bytes([lm_data.EOD]), np.uint8)
    key = jax.random.wrap_key_data(jax.device_put(jax.device_get(rng_data), device))  # not the mesh's
    out = generate(model, jnp.asarray(prompt, jnp.int32)[None], args.sample_tokens,
                   temperature=args.temperature, top_k=None if args.temperature == 0 else args.top_k,
                   rng=key, eos_token_id=lm_data.EOD)
    data = bytes(np.asarray(out[0]).astype(np.uint8).tolist()).split(bytes([lm_data.EOD]))[0]
    return args.prompt + data.decode("utf-8", errors="replace")


def _progress(args, start, stop):
    from tqdm import tqdm

    return tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True, disable=args.no_progress,
                file=sys.stderr, leave=True)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Train (or resume), evaluate, checkpoint, plot and sample. Returns a summary dict:
    {"step", "train": [records], "val": [records], "sample", "out_dir", "wall_s"}."""
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    run = setup(args)
    cfg = run.cfg
    out = resolve_out_dir(args)
    ckpt_dir = os.path.join(out, "checkpoints")

    # Resume or start over: decided before compiling anything.
    has_ckpt = _has_checkpoint(out)
    if args.resume and not has_ckpt:
        raise UsageError(f"--resume: no checkpoint in {ckpt_dir}; start a run without --resume")
    if has_ckpt and not args.resume:
        if not args.overwrite:
            raise UsageError(f"{out} already holds a run (checkpoints in {ckpt_dir}); pass --resume "
                             "to continue it, --overwrite to start over, or another --out-dir")
        shutil.rmtree(ckpt_dir)
    os.makedirs(out, exist_ok=True)
    if not args.resume and os.path.exists(os.path.join(out, "sample.txt")):
        os.remove(os.path.join(out, "sample.txt"))  # a fresh run leaves nothing stale behind
    checkpoints = Checkpoints(ckpt_dir, args.keep_checkpoints)
    start_step = 0
    if args.resume:
        try:  # the newest intact checkpoint (orbax reshards onto this run's mesh)
            start_step, state, saved = checkpoints.restore_newest_intact(
                run.abstract_state(), lambda meta: check_resume_flags(meta["flags"], args))
        except BaseException:
            checkpoints.close()
            raise
        if saved["steps"] != args.steps:
            print(f"note: --steps {args.steps} differs from the checkpointed run's {saved['steps']}; "
                  "the learning-rate schedule changes with it")
    stop = args.stop_at or args.steps
    if start_step >= stop:
        print(f"nothing to train: the checkpoint is at step {start_step}, the run stops at {stop}")

    n_params = cfg.num_params
    tokens_per_step = args.batch_size * args.seq_len
    print(f"run directory: {out}")
    print(f"data: {run.corpus.summary()}; {run.batches.windows_per_epoch} sequences of "
          f"{args.seq_len} bytes per epoch")
    print(f"model: preset {args.preset}, d {cfg.embedding_dim}, {cfg.num_blocks} blocks, "
          f"{cfg.num_heads} heads, {n_params / 1e6:.2f}M parameters, compute {cfg.dtype.name}, "
          f"mLSTM {cfg.mlstm_implementation or 'auto'} on {jax.default_backend()}")
    print(f"devices: {run.mesh.size} ({dict(run.mesh.shape)}), batch {args.batch_size} x "
          f"{args.seq_len} = {tokens_per_step} tokens/step in {args.grad_accum} micro-batch(es)")

    with open(os.path.join(out, "config.json.tmp"), "w") as fh:
        json.dump({"flags": vars(args), "model": {k: str(v) if k.endswith("dtype") else v
                                                  for k, v in dataclasses.asdict(cfg).items()}},
                  fh, indent=2)
    os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))

    # State: fresh or restored.
    if args.resume:
        run.batches.load_state_dict(saved["data"])
        print(f"resumed from {ckpt_dir}/{start_step} (data epoch {saved['data']['epoch']}, "
              f"sequence {saved['data']['index']})")
    else:
        state = run.init_state()
    metrics = Metrics(os.path.join(out, "metrics.jsonl"), start_step if args.resume else None)

    resets = not args.no_document_resets
    train_step = make_train_step(run.graphdef, run.tx, run.schedule, run.mesh, run.param_dims,
                                 run.param_specs, run.state_shardings, **step_options(args))
    eval_step = make_eval_step(run.graphdef, run.mesh, run.param_dims, run.param_specs,
                               document_resets=resets, loss_chunk=args.loss_chunk or None)
    val_batches = [jax.device_put(w, NamedSharding(run.mesh, P(BATCH_AXES)))
                   for w in run.val_windows]
    first_batch = None
    if start_step < stop:
        t0 = time.perf_counter()
        first_batch = run.batch()
        train_step = train_step.lower(state, first_batch).compile()  # ahead of time: not in tok/s
        print(f"compiled the train step in {time.perf_counter() - t0:.1f} s")

    def save(step):
        meta = dict(data=run.batches.state_dict(), flags=run_flags(args), steps=args.steps)
        checkpoints.save(step, state, meta)

    def validate(step):
        loss = evaluate(eval_step, state["params"], val_batches)
        metrics.add(split="val", step=step, loss=loss, bpb=loss / LN2)
        return loss / LN2

    title = (f"xLSTM {args.preset} ({n_params / 1e6:.2f}M params), {args.seq_len}-byte sequences, "
             f"batch {args.batch_size}")
    val_bpb = None
    if start_step == 0 and stop > 0:
        val_bpb = validate(0)
        print(f"step 0: validation {val_bpb:.3f} bits/byte")

    bar = _progress(args, start_step, stop)
    window, pending, last_saved = [], None, start_step if args.resume else None
    t_window, steps_window = time.perf_counter(), 0
    step = start_step

    def drain():
        """Fetch the newest step's metrics (one step behind the device), guard, log."""
        nonlocal pending, t_window, steps_window
        if pending is None:
            return
        s, m = pending
        pending = None
        m = jax.device_get(m)
        if not m["finite"]:
            raise TrainingDiverged(
                f"step {s}: the loss ({m['loss']}) or gradient norm ({m['grad_norm']}) is not "
                f"finite; stopped without applying the step. The last good checkpoint is "
                f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in {ckpt_dir}; "
                "continue with --resume and a lower --lr or more --warmup-steps")
        window.append(float(m["loss"]))
        steps_window += 1
        if s % args.log_every == 0 or s == stop:
            dt = time.perf_counter() - t_window
            tok_s = steps_window * tokens_per_step / max(dt, 1e-9)
            loss = float(np.mean(window))
            metrics.add(split="train", step=s, loss=loss, bpb=loss / LN2, lr=float(m["lr"]),
                        grad_norm=float(m["grad_norm"]), tokens_per_s=tok_s,
                        time_s=time.perf_counter() - t_start)
            bar.set_postfix(loss=f"{loss:.3f}", val_bpb=f"{val_bpb:.3f}" if val_bpb else "-",
                            tok_s=f"{tok_s:,.0f}")
            window.clear()
            t_window, steps_window = time.perf_counter(), 0

    try:
        while step < stop:
            tokens = first_batch if first_batch is not None else run.batch()
            first_batch = None
            state, m = train_step(state, tokens)
            step += 1
            drain()
            pending = (step, m)
            bar.update(1)
            if step % args.eval_every == 0 or step == args.steps or step % args.ckpt_every == 0 \
                    or step == stop:
                drain()
                if step % args.eval_every == 0 or step == args.steps:
                    val_bpb = validate(step)
                    bar.write(f"step {step}: validation {val_bpb:.3f} bits/byte")
                if step % args.ckpt_every == 0 or step == stop:
                    save(step)
                    last_saved = step
                t_window, steps_window = time.perf_counter(), 0  # tokens/s: training time only
    except KeyboardInterrupt:
        try:
            drain()
            if step != last_saved:
                save(step)
            print(f"\ninterrupted: checkpoint at step {step}; continue with --resume")
        except Exception as e:  # e.g. interrupted inside the step, whose input was donated
            print(f"\ninterrupted; no checkpoint of step {step} ({e}); the newest is "
                  f"{last_saved} in {ckpt_dir}")
        raise
    finally:
        bar.close()
        checkpoints.close()
        plot_metrics(metrics, os.path.join(out, "loss.png"), title)
    drain()

    sample = None
    if step == args.steps and args.sample_tokens:
        sample = sample_text(run, state["params"], state["rng"], args)
        with open(os.path.join(out, "sample.txt"), "w") as fh:
            fh.write(sample)
        print("sample:\n" + "-" * 72 + "\n" + sample + "\n" + "-" * 72)
    val = metrics.split("val")
    wall = time.perf_counter() - t_start
    if val:
        print(f"validation bits/byte: {val[0]['bpb']:.3f} (step {val[0]['step']}) -> "
              f"{val[-1]['bpb']:.3f} (step {val[-1]['step']}); {wall:.0f} s")
    if step < args.steps:
        print(f"stopped at step {step} of {args.steps}; continue with --resume")
    print(f"wrote {out}/metrics.jsonl, {out}/loss.png, checkpoints in {ckpt_dir}"
          + (f", {out}/sample.txt" if sample else ""))
    return dict(step=step, train=metrics.split("train"), val=val, sample=sample, out_dir=out,
                wall_s=wall)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, lm_data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, CheckpointError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
