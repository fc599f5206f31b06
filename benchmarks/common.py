"""Shared benchmark harness: timer, peak memory, mLSTM inputs, FLOP/byte counts, roofline, writer.

JAX is imported inside the functions that need it: the torch peer processes of bench_peers.py use
this module too, and a JAX backend started there would take 75% of the GPU's memory.

Counting (design §3; per (b, h) sequence, causal fraction 1/2, chunk L, dtype size s):
  mLSTM forward   FLOP  = T [2 (1/2) L (K + V) + 4 K V]   (useful work: no recomputation)
                  bytes = T (2K + 2V) s + (T/L) 8 K V + 16 T
                          (q, k, v, h once; float32 C_k written once and read once; float32
                          gates in, two float32 residual rows out)
  mLSTM fwd+bwd   FLOP  = 3.5 x forward (backward ~2.5x: two matmuls per forward matmul plus the
                          recomputed chunk states), bytes = 3 x forward
  causal attention forward FLOP = 2 T^2 D (half of 4 T^2 D), bytes = 4 T D s;
                   fwd+bwd FLOP = 3.5 x forward, bytes = 3 x forward.
Roofline time = max(FLOP / peak FLOP/s, bytes / peak B/s); "roof%" = roofline time / median time.
"""

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

# Ceilings measured on the lent machines (/work/.library/device/KINDS.md): bf16 dense matmul on
# random data (FLOP/s), device-to-device copy counting read + written bytes (B/s).
PEAKS = {"H200": (790e12, 4.3e12), "H100": (800e12, 3.0e12)}
DEFAULT_PEAK = PEAKS["H200"]
# Rotate input sets until they hold at least this much: 2x the H200's 60 MB L2.
ROTATE_BYTES = 120e6
MAX_SETS = 16
F_BIAS = 3.0  # forget-gate pre-activation f ~ N(0, 1) + F_BIAS: long memory, like trained models


# ----------------------------------------------------------------------------------------------
# Device and run info
# ----------------------------------------------------------------------------------------------

def run_info(**extra) -> dict:
    """Device name, date, versions; the JAX fields only if JAX is already imported here."""
    info = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                python=platform.python_version(), host=platform.node())
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        d = jax.devices()[0]
        info.update(device=d.device_kind, platform=d.platform, jax=jax.__version__)
    info.update(extra)
    return info


def peaks_for(device: str, peak_tflops=None, peak_tbps=None):
    """(FLOP/s, B/s) ceilings for a device name; explicit values win."""
    flops, bw = next((p for name, p in PEAKS.items() if name in (device or "")), DEFAULT_PEAK)
    return (peak_tflops * 1e12 if peak_tflops else flops), (peak_tbps * 1e12 if peak_tbps else bw)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def n_sets_for(set_bytes: int) -> int:
    """How many input sets to rotate so that together they exceed ROTATE_BYTES (>= 2)."""
    return int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / max(set_bytes, 1)))))


def summarize(ms: list) -> dict:
    """min / median / p90 of per-call times in ms."""
    s = sorted(ms)
    return dict(ms=statistics.median(s), min_ms=s[0],
                p90_ms=s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)], reps=len(s))


def time_jax(fn, arg_sets, reps=20, warmup=3, batch=1) -> dict:
    """Per-call wall time of fn(*args) over rotating arg_sets, after compile + warm-up.

    fn: a jitted function; arg_sets: list of argument tuples (device arrays, never constants).
    batch 1: each call is synchronised with jax.block_until_ready (dispatch and sync included).
    batch n > 1: a sample is n calls dispatched back to back and synchronised once, divided by
    n: the device's time per call, as time_torch's CUDA events measure it for the torch peers.
    """
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    first_s = time.perf_counter() - t0
    for r in range(warmup):
        jax.block_until_ready(fn(*arg_sets[r % len(arg_sets)]))
    ms = []
    for r in range(max(reps, 20)):
        t0 = time.perf_counter()
        for j in range(batch):
            out = fn(*arg_sets[(r * batch + j) % len(arg_sets)])
        jax.block_until_ready(out)                # one stream: the last call ends after the rest
        ms.append(1e3 * (time.perf_counter() - t0) / batch)
    return dict(summarize(ms), first_call_s=first_s, sets=len(arg_sets), batch=batch)


def time_torch(fn, arg_sets, reps=20, warmup=3) -> dict:
    """Per-call GPU time of fn(*args) (torch.cuda.Event pairs) over rotating arg_sets."""
    import torch

    t0 = time.perf_counter()
    fn(*arg_sets[0])
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for r in range(warmup):
        fn(*arg_sets[r % len(arg_sets)])
    torch.cuda.synchronize()
    n = max(reps, 20)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for r, (start, end) in enumerate(events):
        args = arg_sets[r % len(arg_sets)]
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return dict(summarize([s.elapsed_time(e) for s, e in events]), first_call_s=first_s,
                sets=len(arg_sets))


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

def compiled_peak_bytes(jitted, *args):
    """XLA's memory analysis of the compiled program: arguments + outputs + temporaries - aliases
    (None where the backend has no analysis)."""
    try:
        m = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def device_peak_bytes():
    """The allocator's lifetime peak on device 0 (None where it keeps no stats, e.g. CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def mlstm_inputs(seed, B, T, H, K, V, dtype="bfloat16", *, state=True, cotangents=True):
    """One mLSTM input set (JAX arrays), all random (never zeros).

    Returns dict: q, k (B,T,H,K) and v (B,T,H,V) ~ N(0,1) in dtype; i ~ N(0,1) and
    f ~ N(0,1) + F_BIAS float32 (B,T,H); with state: c0 (B,H,K,V)/sqrt(K), n0 (B,H,K)/sqrt(K),
    m0 (B,H) float32; with cotangents: dh (B,T,H,V) in dtype, dc (B,H,K,V), dn (B,H,K) float32.
    """
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), 11)
    nrm = lambda j, shape, dt=jnp.float32: jax.random.normal(ks[j], shape, jnp.float32).astype(dt)  # noqa: E731
    x = dict(q=nrm(0, (B, T, H, K), dtype), k=nrm(1, (B, T, H, K), dtype),
             v=nrm(2, (B, T, H, V), dtype), i=nrm(3, (B, T, H)), f=nrm(4, (B, T, H)) + F_BIAS)
    if state:
        x.update(c0=nrm(5, (B, H, K, V)) / math.sqrt(K), n0=nrm(6, (B, H, K)) / math.sqrt(K),
                 m0=nrm(7, (B, H)))
    if cotangents:
        x.update(dh=nrm(8, (B, T, H, V), dtype), dc=nrm(9, (B, H, K, V)), dn=nrm(10, (B, H, K)))
    return x


def segment_ids(seed, B, T, n):
    """(B, T) int32 ids of n segments of random lengths per row (n - 1 distinct random cuts)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = rng.choice(np.arange(1, T), size=min(max(n - 1, 0), T - 1), replace=False)
        ids[b, cuts] = 1
    return jnp.asarray(np.cumsum(ids, axis=1, dtype=np.int32))


def set_bytes(arrays) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in arrays))


# ----------------------------------------------------------------------------------------------
# Counts and roofline
# ----------------------------------------------------------------------------------------------

def mlstm_counts(B, T, H, K, V, L, itemsize, fwdbwd=False):
    """(FLOP, bytes) of the mLSTM, forward or forward+backward (module docstring)."""
    flop = B * H * T * (L * (K + V) + 4 * K * V)
    byts = B * H * (T * (2 * K + 2 * V) * itemsize + (T // L) * 8 * K * V + 16 * T)
    return (3.5 * flop, 3 * byts) if fwdbwd else (flop, byts)


def attention_counts(B, T, H, D, itemsize, fwdbwd=False):
    """(FLOP, bytes) of causal softmax attention, forward or forward+backward."""
    flop, byts = 2 * B * H * T * T * D, 4 * B * H * T * D * itemsize
    return (3.5 * flop, 3 * byts) if fwdbwd else (flop, byts)


def roofline(ms, flop, byts, peaks) -> dict:
    """TFLOP/s, GB moved, roofline time and fraction, and which ceiling binds."""
    pf, pb = peaks
    floor_s = max(flop / pf, byts / pb)
    return dict(tflops=flop / (ms * 1e-3) / 1e12, gbytes=byts / 1e9, roofline_ms=floor_s * 1e3,
                roofline_frac=floor_s / (ms * 1e-3),
                bound="compute" if flop / pf >= byts / pb else "memory")


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

# (row key, header, format) of the markdown table; missing values print as "-".
COLUMNS = [("label", "label", "{}"), ("impl", "impl", "{}"), ("gate", "gate", "{}"),
           ("pass", "pass", "{}"), ("segments", "segs", "{}"), ("B", "B", "{}"),
           ("T", "T", "{}"), ("H", "H", "{}"),
           ("K", "K", "{}"), ("V", "V", "{}"), ("chunk", "L", "{}"), ("ms", "ms", "{:.3f}"),
           ("min_ms", "min", "{:.3f}"), ("p90_ms", "p90", "{:.3f}"),
           ("tflops", "TFLOP/s", "{:.1f}"), ("gbytes", "GB", "{:.2f}"),
           ("roofline_frac", "roof %", "{:.1%}"), ("bound", "bound", "{}"),
           ("peak_mem_gb", "mem GB", "{:.2f}"), ("error", "error", "{:.90}")]


def markdown_table(rows, columns=COLUMNS) -> str:
    """A markdown table of rows (dicts) over the columns that any row has."""
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]

    def cell(r, key, fmt):
        v = r.get(key)
        if v is None:
            return "-"
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)

    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if f == "{}" or k == "error" else "---:"
                            for k, _, f in cols) + "|"]
    lines += ["| " + " | ".join(cell(r, k, f).replace("|", "/") for k, _, f in cols) + " |"
              for r in rows]
    return "\n".join(lines)


def write_results(out_dir, name, rows, info, columns=COLUMNS, table=True) -> str:
    """Writes {info..., rows} to out_dir/name.json, prints the markdown table; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(dict(info, rows=rows), fh, indent=1, default=str)
    if not table:
        return path
    print(f"\n{name}: {info.get('device', '?')}, {info.get('date', '')}"
          + (f", jax {info['jax']}" if "jax" in info else "") + f" -> {path}")
    print(markdown_table(rows, columns), flush=True)
    return path


def log_row(row):
    print(json.dumps(row, default=str), flush=True)


# ----------------------------------------------------------------------------------------------
# tfla_jax API adapter: the old API (git HEAD of 2026-11-22) and the backend API being written
# ----------------------------------------------------------------------------------------------

KERNEL_IMPLS = ("pallas_triton", "pallas_mosaic_gpu", "pallas")  # "pallas": fastest Pallas one
# Config class per implementation name where the package has no backend registry saying so
# (get_backend(name).config_cls); looked up on the package; absent -> no tiling config.
CONFIG_CLASSES = {"pallas_triton": "TritonConfig", "pallas_mosaic_gpu": "MosaicGPUConfig",
                  "pallas": "TilingConfig"}


def import_tfla(package_root=None):
    """Imports tfla_jax, from package_root first on sys.path when given."""
    if package_root:
        if "tfla_jax" in sys.modules:
            raise RuntimeError("tfla_jax already imported; --package-root must come first")
        sys.path.insert(0, os.path.abspath(package_root))
    import tfla_jax

    return tfla_jax


class Tfla:
    """The calls the benchmarks make of a tfla_jax package, old API or new."""

    def __init__(self, tfla):
        self.m = tfla
        self.new_api = hasattr(tfla, "TritonConfig")

    def info(self) -> dict:
        return dict(tfla_jax_file=os.path.dirname(self.m.__file__),
                    tfla_jax_version=getattr(self.m, "__version__", None),
                    api="backends" if self.new_api else "tiling-config")

    def registered(self):
        """Kernel backend names of the package's registry, fastest first ([] without one)."""
        fn = getattr(self.m, "available_backends", None) or getattr(
            getattr(self.m, "backends", None), "available_backends", None)
        return list(fn()) if callable(fn) else []

    def candidate_kernels(self):
        return list(dict.fromkeys(self.registered() + list(KERNEL_IMPLS)))

    def available(self, impl, interpret=False) -> bool:
        """Whether tfla_jax.mlstm accepts impl here (traced on a tiny abstract bf16 input)."""
        import jax
        import jax.numpy as jnp

        q = jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.bfloat16)
        g = jax.ShapeDtypeStruct((1, 64, 1), jnp.float32)
        try:
            jax.eval_shape(lambda q, k, v, i, f: self.m.mlstm(
                q, k, v, i, f, implementation=impl, interpret=interpret or None)[0],
                q, q, q, g, g)
            return True
        except Exception:  # noqa: BLE001 - unknown name, no GPU, not built for this device
            return False

    def default_impls(self, interpret=False):
        """Every kernel backend available here (the "pallas" alias only where it is the one
        backend, as in the old API), then "chunkwise"."""
        kernels = [n for n in self.candidate_kernels() if self.available(n, interpret)]
        if len(kernels) > 1 and "pallas" in kernels:
            kernels.remove("pallas")
        return kernels + ["chunkwise"]

    def config_class(self, impl):
        """The config dataclass of impl ("pallas" in the registry API: of the fastest backend)."""
        registered = self.registered()
        if impl == "pallas" and registered:
            impl = registered[0]
        get = getattr(self.m, "get_backend", None)
        if impl in registered and callable(get):
            return getattr(get(impl), "config_cls", None)
        return getattr(self.m, CONFIG_CLASSES.get(impl, ""), None)

    def default_config(self, impl, K, V, T, dtype, gate, chunk=None):
        """The backend's default config (at chunk L if given), or None without a config class."""
        import inspect

        import jax

        cls = self.config_class(impl)
        if cls is None:
            return None
        params = inspect.signature(cls.default).parameters
        kw = {"device_kind": jax.devices()[0].device_kind} if "device_kind" in params else {}
        if chunk is not None and "chunk_size" in params:
            kw["chunk_size"] = chunk
        cfg = cls.default(K, V, T, dtype, gate, **kw)
        if chunk is not None and "chunk_size" not in kw:
            cfg = dataclasses.replace(cfg, chunk_size=chunk)
        return cfg

    def chunk_used(self, impl, K, V, T, dtype, gate, chunk=None, config=None):
        """The chunk length L the call runs with (for the counts), or None if not known."""
        if chunk is not None:
            return chunk
        if config is not None:
            return getattr(config, "chunk_size", None)
        cfg = self.default_config(impl, K, V, T, dtype, gate)
        if cfg is not None:
            return getattr(cfg, "chunk_size", None)
        if impl == "chunkwise":
            default = getattr(getattr(self.m, "ops", None), "DEFAULT_CHUNK_SIZE_XLA", 64)
            return min(default, 1 << max(0, (T - 1).bit_length()))
        return None

    def call_kwargs(self, impl, K, V, T, dtype, gate, chunk=None, overrides=None):
        """(kwargs for tfla_jax.mlstm selecting impl, chunk and config; the config or None).

        Without overrides the package picks its own tiling (config=None); with overrides they are
        applied by dataclasses.replace to the backend's default config at that chunk.
        """
        kw = dict(implementation=impl)
        if overrides and self.config_class(impl) is not None:
            cfg = dataclasses.replace(self.default_config(impl, K, V, T, dtype, gate, chunk),
                                      **overrides)
            return dict(kw, config=cfg), cfg
        return dict(kw, chunk_size=chunk), None


def gate_options(gate: str) -> dict:
    """--gates entry -> tfla_jax.mlstm options: exp, sigmoid, sigmoid-nonorm."""
    return {"exp": dict(input_gate="exp", normalize=True),
            "sigmoid": dict(input_gate="sigmoid", normalize=True),
            "sigmoid-nonorm": dict(input_gate="sigmoid", normalize=False)}[gate]


def parse_overrides(text):
    """"a=1,b=true,c=none,d=x" -> {"a": 1, "b": True, "c": None, "d": "x"}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, val = item.partition("=")
        low = val.strip().lower()
        if low in ("true", "false", "none"):
            out[key.strip()] = None if low == "none" else low == "true"
            continue
        for cast in (int, float):
            try:
                out[key.strip()] = cast(val)
                break
            except ValueError:
                pass
        else:
            out[key.strip()] = val.strip()
    return out
