"""Backward and forward+backward timings of the TFLA Pallas kernels (GPU).

    PYTHONPATH=. python3 benchmarks/bench_bwd.py [--sections full,kernels,fwdbwd,others]
                                                  [--chunks 64,128,256] [--out DIR]

Shape of the issue's bar: B=8, T=8192, H=8, K=256, V=512, bf16, random inputs.
  full:    mlstm_bwd alone (default BwdTilingConfig), per chunk size and gate, median of >= 20 runs
  kernels: each backward kernel alone at chunk 256 for a few tilings, with executed FLOPs and the
           fewest HBM bytes it must move, so each one can be placed against the roofline
  fwdbwd:  forward (tfla_jax.pallas.fwd) + backward through a custom_vjp, time and peak memory
           (XLA's compiled memory analysis: arguments + outputs + temporaries)
  others:  the same forward+backward for cuDNN attention (H=32, D=128, same tokens) and the
           pure-JAX chunkwise path
Writes bench_bwd.json (and prints a table) into --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from tfla_jax import MLSTMState, ref
from tfla_jax.pallas import TilingConfig, bwd, mlstm_fwd
from tfla_jax.pallas.bwd import BwdTilingConfig, mlstm_bwd

SHAPE = dict(B=8, T=8192, H=8, K=256, V=512)
DTYPE = jnp.bfloat16
# On a machine without a GPU the scripts dry-run at toy shapes in interpret mode.
INTERPRET = jax.default_backend() == "cpu"
if INTERPRET:
    SHAPE = dict(B=1, T=512, H=1, K=32, V=64)
RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform})"


def bench(fn, *args, reps=20):
    """Median wall time (ms) of fn(*args) after a compile/warm-up call; block_until_ready."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def random_inputs(seed, B, T, H, K, V, dtype=DTYPE):
    """q, k, v ~ N(0, 1) in dtype; i ~ N(0, 1), f ~ N(0, 1) + 2 float32 (B, T, H)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, T, H, K), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, H, K), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, V), jnp.float32).astype(dtype)
    i = jax.random.normal(keys[3], (B, T, H), jnp.float32)
    f = jax.random.normal(keys[4], (B, T, H), jnp.float32) + 2.0
    return q, k, v, i, f


def forward_fn(gate, normalize, chunk, keep_states, interpret=INTERPRET):
    """(q, k, v, i, f, c0, n0, m0) -> (h, (c_T, n_T, m_T), (den, m_row), states-or-None).

    The Pallas forward of tfla_jax.pallas.fwd; with BWD_FORWARD=reference the plain-jnp
    `ref.mlstm_chunkwise(..., return_residuals=True)`.
    """
    if os.environ.get("BWD_FORWARD") == "reference":
        log("  (plain-jnp forward: BWD_FORWARD=reference)")

        def fwd(q, k, v, i, f, c0, n0, m0):
            h, final, res, states = ref.mlstm_chunkwise(
                q, k, v, i, f, initial_state=MLSTMState(c0, n0, m0), input_gate=gate,
                normalize=normalize, chunk_size=chunk, return_residuals=True)
            return h, final, res, (states if keep_states else None)
        return fwd

    def fwd(q, k, v, i, f, c0, n0, m0):
        K, V, T = q.shape[-1], v.shape[-1], q.shape[1]
        cfg = TilingConfig.default(K, V, T, q.dtype, gate, chunk_size=chunk)
        h, final, res = mlstm_fwd(q, k, v, i, f, c0, n0, m0, input_gate=gate,
                                  normalize=normalize, config=cfg, interpret=interpret,
                                  return_states=keep_states)
        return h, final, res[:2], (tuple(res[2:]) if keep_states else None)
    return fwd


def make_op(gate, normalize, chunk, bwd_config=None, keep_states=False, interpret=INTERPRET):
    """custom_vjp (q, k, v, i, f, c0, n0, m0) -> (h, c_T, n_T): Pallas forward, mlstm_bwd."""
    fwd = forward_fn(gate, normalize, chunk, keep_states, interpret)
    cfg = bwd_config or BwdTilingConfig.get_default(chunk)

    @jax.custom_vjp
    def op(q, k, v, i, f, c0, n0, m0):
        h, (c_t, n_t, _), _, _ = fwd(q, k, v, i, f, c0, n0, m0)
        return h, c_t, n_t

    def op_fwd(q, k, v, i, f, c0, n0, m0):
        h, (c_t, n_t, _), (den, m_row), states = fwd(q, k, v, i, f, c0, n0, m0)
        return (h, c_t, n_t), (q, k, v, i, f, c0, n0, m0, h, den, m_row, states)

    def op_bwd(res, cts):
        q, k, v, i, f, c0, n0, m0, h, den, m_row, states = res
        dh, dc_t, dn_t = cts
        grads = mlstm_bwd(q, k, v, i, f, c0, n0, m0, h, den, m_row, dh, dc_t, dn_t,
                          input_gate=gate, normalize=normalize, config=cfg,
                          interpret=interpret, states=states)
        return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v, i, f, c0, n0, m0)))

    op.defvjp(op_fwd, op_bwd)
    return op


def zero_state(B, H, K, V):
    return (jnp.zeros((B, H, K, V), jnp.float32), jnp.zeros((B, H, K), jnp.float32),
            jnp.zeros((B, H), jnp.float32))


# ----------------------------------------------------------------------------------------------
# FLOP and byte counts (per kernel, executed work; bytes = fewest HBM bytes it must move)
# ----------------------------------------------------------------------------------------------

def _tile_pairs(L, bq, bkv):
    """(query tile, kv tile) pairs visited per chunk (causal, diagonal tiles included)."""
    return sum(-(-((j + 1) * bq) // bkv) for j in range(L // bq))


def kernel_costs(B, T, H, K, V, L, itemsize=2, bq=64, bkv=64, bko=None, bvo=256):
    """{kernel: (executed FLOP, fewest HBM bytes)}; states stored in bf16 for bf16 inputs."""
    bko = bko or K
    bvo = min(bvo, V)
    N, NC, BH = B * T * H, T // L, B * H
    pairs = BH * NC * _tile_pairs(L, bq, bkv)
    state_bytes = BH * (NC + 1) * K * V * (2 if itemsize == 2 else 4)
    qk, vv = N * K * itemsize, N * V * itemsize
    return {
        "chunk_states": (2 * N * K * V, qk + vv + state_bytes),
        "state_grads": (2 * N * K * V, qk + vv + state_bytes),
        "dq": (pairs * (K // bko) * 2 * bq * bkv * (V + bko) + 2 * N * K * V,
               3 * qk + 2 * vv + state_bytes),
        "dk": (pairs * (K // bko) * 2 * bq * bkv * (V + bko) + 2 * N * K * V,
               3 * qk + 2 * vv + state_bytes),
        "dv": (pairs * (V // bvo) * 2 * bq * bkv * (K + bvo) + 2 * N * K * V,
               2 * qk + 2 * vv + state_bytes),
    }


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

def section_full(chunks, gates):
    """mlstm_bwd alone, default config, states recomputed (and kept at the largest chunk)."""
    B, T, H, K, V = SHAPE.values()
    q, k, v, i, f = random_inputs(0, B, T, H, K, V)
    c0, n0, m0 = zero_state(B, H, K, V)
    dh = jax.random.normal(jax.random.key(7), (B, T, H, V), jnp.float32).astype(DTYPE)
    dc_t, dn_t = jnp.ones((B, H, K, V), jnp.float32) * 1e-3, jnp.ones((B, H, K), jnp.float32) * 1e-3
    out = {}
    for gate, normalize in gates:
        for L in chunks:
            for keep in ([False, True] if L == max(chunks) else [False]):
                name = f"{gate}{'' if normalize else '-nonorm'}-L{L}{'-kept' if keep else ''}"
                try:
                    fwd = jax.jit(forward_fn(gate, normalize, L, keep))
                    h, _, (den, m_row), states = fwd(q, k, v, i, f, c0, n0, m0)
                    t_fwd = bench(fwd, q, k, v, i, f, c0, n0, m0)
                    cfg = bwd_config(L)
                    run = jax.jit(lambda *a, states=None: mlstm_bwd(
                        *a, input_gate=gate, normalize=normalize, config=cfg, states=states,
                        interpret=INTERPRET))
                    args = (q, k, v, i, f, c0, n0, m0, h, den, m_row, dh, dc_t, dn_t)
                    t0 = time.perf_counter()
                    jax.block_until_ready(run(*args, states=states))
                    t_compile = time.perf_counter() - t0
                    t = bench(lambda *a: run(*a, states=states), *args)
                    out[name] = dict(bwd_ms=t, fwd_ms=t_fwd, first_call_s=t_compile)
                    log(f"  full {name:24s} bwd {t:8.3f} ms   fwd {t_fwd:7.3f} ms")
                except Exception as e:  # keep going: report what ran
                    out[name] = dict(error=repr(e)[:500])
                    log(f"  full {name}: FAILED {e!r}"[:800])
                    traceback.print_exc()
    RESULTS["full"] = out


def _kernel_inputs(L):
    """Random float32 gate rows and states of the right shapes (values only need to be finite)."""
    B, T, H, K, V = SHAPE.values()
    NC = T // L
    q, k, v, _, _ = random_inputs(1, B, T, H, K, V)
    dh = jax.random.normal(jax.random.key(3), (B, T, H, V), jnp.float32).astype(DTYPE)
    rk = jax.random.split(jax.random.key(5), 8)
    rows = lambda j, lo, hi: jax.random.uniform(rk[j], (B, H, T), jnp.float32, lo, hi)
    b = -jnp.cumsum(rows(0, 0.0, 0.1).reshape(B, H, NC, L), -1).reshape(B, H, T)
    logi, m_row = rows(1, -1.0, 0.0), rows(2, 0.0, 1.0)
    inv_n, dden, w = rows(3, 0.5, 1.0), rows(4, -0.1, 0.1), rows(5, 0.1, 1.0)
    decay = jax.random.uniform(rk[6], (B, H, NC), jnp.float32, 0.5, 1.0)
    cs = (jax.random.normal(rk[7], (B, H, NC + 1, K, V), jnp.float32) * 0.01).astype(DTYPE)
    ns = jnp.zeros((B, H, NC + 1, K), jnp.float32) + 0.01
    c0 = jnp.zeros((B, H, K, V), jnp.float32)
    n0 = jnp.zeros((B, H, K), jnp.float32)
    return dict(q=q, k=k, v=v, dh=dh, b=b, logi=logi, m_row=m_row, inv_n=inv_n, dden=dden,
                w=w, decay=decay, cs=cs, ns=ns, c0=c0, n0=n0)


def section_kernels(L, variants):
    """Each backward kernel alone for a few tilings; executed TFLOP/s and GB/s of fewest bytes."""
    B, T, H, K, V = SHAPE.values()
    x = _kernel_inputs(L)
    scale = K ** -0.5
    out = {}
    if INTERPRET:  # dry run at toy shapes: small variants
        variants = {"state": [(16, 32, 16, 4, 2), (32, 32, 32, 4, 2)],
                    "dqdk": [(32, 16, 32, 16, 4, 2), (32, 32, 32, 32, 4, 2)],
                    "dv": [(16, 32, 16, 32, 4, 2), (32, 32, 32, 32, 4, 2)]}

    def run(kernel, label, fn, flops, nbytes):
        try:
            t = bench(jax.jit(fn), x)  # arrays as arguments, never as jit constants
            out[f"{kernel}/{label}"] = dict(ms=t, tflops=flops / t * 1e-9, gbps=nbytes / t * 1e-6)
            log(f"  {kernel:13s} {label:44s} {t:8.3f} ms {flops / t * 1e-9:7.1f} TFLOP/s "
                f"{nbytes / t * 1e-6:7.0f} GB/s")
        except Exception as e:
            out[f"{kernel}/{label}"] = dict(error=repr(e)[:500])
            log(f"  {kernel} {label}: FAILED {e!r}"[:600])

    for bk, bv, bt, nw, ns in variants["state"]:
        label = f"bk{bk} bv{bv} bt{bt} w{nw} s{ns}"
        fl, nb = kernel_costs(B, T, H, K, V, L)["chunk_states"]
        tiles = dict(chunk=L, block_k=bk, block_v=bv, block_t=bt, num_warps=nw, num_stages=ns,
                     interpret=INTERPRET)
        run("chunk_states", label, lambda x: bwd.chunk_states(
            x["k"], x["v"], x["w"], x["decay"], x["c0"], x["n0"], **tiles), fl, nb)
        run("state_grads", label, lambda x: bwd.state_grads(
            x["q"], x["dh"], x["w"], x["dden"], x["decay"], x["cs"], x["c0"], x["n0"], **tiles),
            fl, nb)
    for bq, bkv, bv, bko, nw, ns in variants["dqdk"]:
        label = f"bq{bq} bkv{bkv} bv{bv} bko{bko} w{nw} s{ns}"
        fl, nb = kernel_costs(B, T, H, K, V, L, bq=bq, bkv=bkv, bko=bko)["dq"]
        common = dict(chunk=L, block_q=bq, block_kv=bkv, block_v=bv, block_k_out=bko,
                      scale=scale, num_warps=nw, num_stages=ns, interpret=INTERPRET)
        run("dq", label, lambda x: bwd.intra_chunk_dq(
            x["q"], x["k"], x["v"], x["dh"], x["b"], x["m_row"], x["inv_n"], x["dden"], x["w"],
            x["logi"], x["cs"], x["ns"], **common), fl, nb)
        run("dk", label, lambda x: bwd.intra_chunk_dk(
            x["q"], x["k"], x["v"], x["dh"], x["b"], x["m_row"], x["inv_n"], x["dden"],
            x["logi"], x["w"], x["cs"], x["ns"], **common), fl, nb)
    for bq, bkv, bk, bvo, nw, ns in variants["dv"]:
        label = f"bq{bq} bkv{bkv} bk{bk} bvo{bvo} w{nw} s{ns}"
        fl, nb = kernel_costs(B, T, H, K, V, L, bq=bq, bkv=bkv, bvo=bvo)["dv"]
        run("dv", label, lambda x: bwd.intra_chunk_dv(
            x["q"], x["k"], x["v"], x["dh"], x["b"], x["m_row"], x["inv_n"], x["logi"], x["w"],
            x["cs"], chunk=L, block_q=bq, block_kv=bkv, block_k=bk, block_v_out=bvo,
            scale=scale, num_warps=nw, num_stages=ns, interpret=INTERPRET), fl, nb)
    RESULTS.setdefault("kernels", {})[f"L{L}"] = out
    tune(out, variants)


def tune(out, variants):
    """The fastest measured variant of each kernel family, as a BwdTilingConfig (TUNED)."""
    global TUNED

    def best(family, kernels, fmt):
        times = {}
        for vs in variants[family]:
            label = fmt(*vs)
            ts = [out.get(f"{kn}/{label}", {}).get("ms") for kn in kernels]
            if all(t is not None for t in ts):
                times[vs] = sum(ts)
        return min(times, key=times.get) if times else None

    st = best("state", ("chunk_states", "state_grads"), lambda bk, bv, bt, nw, ns:
              f"bk{bk} bv{bv} bt{bt} w{nw} s{ns}")
    qk = best("dqdk", ("dq", "dk"), lambda bq, bkv, bv, bko, nw, ns:
              f"bq{bq} bkv{bkv} bv{bv} bko{bko} w{nw} s{ns}")
    dv = best("dv", ("dv",), lambda bq, bkv, bk, bvo, nw, ns:
              f"bq{bq} bkv{bkv} bk{bk} bvo{bvo} w{nw} s{ns}")
    cfg = BwdTilingConfig.get_default(256, SHAPE["K"], SHAPE["V"], DTYPE)
    if st:
        cfg = dataclasses.replace(cfg, block_k_state=st[0], block_v_state=st[1],
                                  block_t_state=st[2], num_warps_state=st[3],
                                  num_stages_state=st[4])
    if qk:
        cfg = dataclasses.replace(cfg, block_q=qk[0], block_kv=qk[1], block_v=qk[2],
                                  block_k_out=qk[3], num_warps=qk[4], num_stages=qk[5])
    if dv:
        cfg = dataclasses.replace(cfg, block_q_dv=dv[0], block_kv_dv=dv[1], block_k=dv[2],
                                  block_v_out=dv[3], num_warps_dv=dv[4], num_stages_dv=dv[5])
    TUNED = cfg
    RESULTS["tuned_config"] = dataclasses.asdict(cfg)
    log(f"  tuned: {cfg}")


TUNED = None


def bwd_config(L):
    """The tuned tiling (if the kernels section ran) at chunk L, else the default."""
    K, V = SHAPE["K"], SHAPE["V"]
    if TUNED is None:
        return BwdTilingConfig.get_default(L, K, V, DTYPE)
    return dataclasses.replace(TUNED, chunk_size=L)


KERNEL_VARIANTS = {
    # (block_k, block_v, block_t, num_warps, num_stages) of the two sequential state kernels
    "state": [(64, 64, 64, 4, 2), (64, 64, 64, 4, 3), (128, 128, 64, 8, 2), (128, 128, 64, 8, 3),
              (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (256, 64, 64, 8, 2),
              (128, 128, 128, 8, 2)],
    # (block_q, block_kv, block_v, block_k_out, num_warps, num_stages) of dq and dk
    "dqdk": [(64, 64, 64, 256, 8, 3), (64, 64, 128, 256, 8, 3), (64, 64, 64, 256, 8, 4),
             (64, 64, 32, 256, 8, 3), (64, 64, 128, 256, 8, 2), (64, 32, 64, 256, 8, 3)],
    # (block_q, block_kv, block_k, block_v_out, num_warps, num_stages) of dv
    "dv": [(64, 64, 128, 256, 8, 2), (64, 64, 128, 256, 8, 3), (64, 64, 256, 256, 8, 2),
           (64, 64, 64, 256, 8, 3), (64, 64, 128, 128, 4, 3), (32, 64, 128, 256, 8, 3)],
}


def section_fwdbwd(chunks, gates, keep=(False, True)):
    """Forward + backward (jax.vjp of the custom_vjp op) time and compiled peak memory."""
    B, T, H, K, V = SHAPE.values()
    q, k, v, i, f = random_inputs(2, B, T, H, K, V)
    c0, n0, m0 = zero_state(B, H, K, V)
    dh = jax.random.normal(jax.random.key(9), (B, T, H, V), jnp.float32).astype(DTYPE)
    out = {}
    for gate, normalize in gates:
        for L in chunks:
            for kept in (keep if L == max(chunks) else (False,)):
                name = f"{gate}{'' if normalize else '-nonorm'}-L{L}{'-kept' if kept else ''}"
                try:
                    op = make_op(gate, normalize, L, bwd_config(L), keep_states=kept)

                    def step(q, k, v, i, f, dh):
                        (h, c_t, n_t), vjp = jax.vjp(op, q, k, v, i, f, c0, n0, m0)
                        return vjp((dh, jnp.zeros_like(c_t), jnp.zeros_like(n_t)))[:5]

                    fn = jax.jit(step)
                    mem = fn.lower(q, k, v, i, f, dh).compile().memory_analysis()
                    peak = None
                    if mem is not None:
                        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
                    t = bench(fn, q, k, v, i, f, dh)
                    out[name] = dict(fwd_bwd_ms=t, peak_gb=None if peak is None else peak / 1e9)
                    log(f"  fwd+bwd {name:22s} {t:8.3f} ms   peak "
                        f"{'?' if peak is None else f'{peak / 1e9:.2f}'} GB")
                except Exception as e:
                    out[name] = dict(error=repr(e)[:500])
                    log(f"  fwd+bwd {name}: FAILED {e!r}"[:800])
                    traceback.print_exc()
    RESULTS["fwdbwd"] = out


def section_others():
    """cuDNN attention (H=32, D=128, same tokens) and the pure-JAX chunkwise path, fwd+bwd."""
    from tfla_jax import ref

    B, T, H, K, V = SHAPE.values()
    out = {}
    try:
        ks = jax.random.split(jax.random.key(11), 4)
        ha, da = (2, 64) if INTERPRET else (32, 128)
        qa, ka, va, dha = (jax.random.normal(kk, (B, T, ha, da), jnp.float32).astype(DTYPE)
                           for kk in ks)

        def attn(q, k, v, dh):
            o, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"), q, k, v)
            return vjp(dh)

        t = bench(jax.jit(attn), qa, ka, va, dha)
        out["cudnn_attention_H32_D128"] = dict(fwd_bwd_ms=t)
        log(f"  fwd+bwd cuDNN attention H32 D128     {t:8.3f} ms")
    except Exception as e:
        out["cudnn_attention_H32_D128"] = dict(error=repr(e)[:500])
        log(f"  cuDNN attention FAILED {e!r}"[:600])
    for gate in ("exp", "sigmoid"):
        try:
            q, k, v, i, f = random_inputs(3, B, T, H, K, V)
            dh = jax.random.normal(jax.random.key(4), (B, T, H, V), jnp.float32).astype(DTYPE)

            def chunkwise(q, k, v, i, f, dh):
                h, vjp = jax.vjp(lambda *a: ref.mlstm_chunkwise(
                    *a, input_gate=gate, chunk_size=64)[0], q, k, v, i, f)
                return vjp(dh)

            t = bench(jax.jit(chunkwise), q, k, v, i, f, dh, reps=5)
            out[f"chunkwise_xla_{gate}_L64"] = dict(fwd_bwd_ms=t)
            log(f"  fwd+bwd pure-JAX chunkwise {gate:8s} {t:8.3f} ms")
        except Exception as e:
            out[f"chunkwise_xla_{gate}_L64"] = dict(error=repr(e)[:500])
            log(f"  chunkwise {gate} FAILED {e!r}"[:600])
    RESULTS["others"] = out


def write(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    RESULTS["device"] = device_name()
    RESULTS["shape"] = dict(SHAPE, dtype="bfloat16")
    RESULTS["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(os.path.join(out_dir, "bench_bwd.json"), "w") as fh:
        json.dump(RESULTS, fh, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="full,kernels,fwdbwd,others")
    p.add_argument("--chunks", default="64,128,256")
    p.add_argument("--kernel-chunks", default="256")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    sections = a.sections.split(",")
    chunks = [int(c) for c in a.chunks.split(",")]
    gates = [("sigmoid", True), ("exp", True)]
    log(f"device: {device_name()}  jax {jax.__version__}  shape {SHAPE} bf16")
    B, T, H, K, V = SHAPE.values()
    for L in chunks:
        costs = kernel_costs(B, T, H, K, V, L)
        fl = sum(c[0] for c in costs.values())
        log(f"  L{L}: executed backward FLOP {fl / 1e12:.2f} T; fewest bytes per kernel (GB) "
            + ", ".join(f"{n} {c[1] / 1e9:.2f}" for n, c in costs.items()))
    if "kernels" in sections:
        for L in [int(c) for c in a.kernel_chunks.split(",")]:
            log(f"== kernels alone, L{L}")
            section_kernels(L, KERNEL_VARIANTS)
            write(a.out)
    if "full" in sections:
        log("== backward alone")
        section_full(chunks, gates)
        write(a.out)
    if "fwdbwd" in sections:
        log("== forward + backward")
        section_fwdbwd(chunks, gates)
        write(a.out)
    if "others" in sections:
        log("== references")
        section_others()
        write(a.out)
    log(json.dumps({k: v for k, v in RESULTS.items() if k in ("full", "fwdbwd", "others")},
                   indent=None)[:4000])


if __name__ == "__main__":
    sys.exit(main())
