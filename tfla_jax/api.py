"""The policy: input checks, implementation choice, padding, the gate math around the kernels,
and the one `jax.custom_vjp` every kernel backend runs under (docs/backends.md).
"""

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

from tfla_jax import backends, context, gates, ref
from tfla_jax.state import MLSTMState

XLA_IMPLEMENTATIONS = ("recurrent", "parallel", "chunkwise")


def implementations() -> tuple[str, ...]:
    """Every valid `implementation=` name (the registry is read at call time)."""
    return (*XLA_IMPLEMENTATIONS, "pallas", *backends.available_backends())


INPUT_GATES = ("exp", "sigmoid")
_SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))
DEFAULT_CHUNK_SIZE_XLA = 64

# Jitted once per static configuration: eager calls stay fast, calls under a user's jit inline.
_OPTS = ("input_gate", "normalize", "scale", "eps")
_recurrent = jax.jit(ref.mlstm_recurrent, static_argnames=_OPTS)
_parallel = jax.jit(ref.mlstm_parallel, static_argnames=_OPTS)
_chunkwise = jax.jit(ref.mlstm_chunkwise, static_argnames=_OPTS + ("chunk_size",))
_step = jax.jit(ref.mlstm_step_ref, static_argnames=_OPTS)

def _describe(x) -> str:
    return f"shape {tuple(x.shape)} dtype {x.dtype}"


def _check_float(name, x):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise ValueError(f"{name}: expected an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype} is not supported; expected one of "
                         "bfloat16, float16, float32, float64")


def _real_scalar(x, integer=False):
    """x as a Python float (int if `integer`) when it is a real scalar: a Python or NumPy number
    or a concrete 0-d array (bools excluded; `integer` also excludes floats); else None."""
    if isinstance(x, (bool, np.bool_)) or isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, numbers.Real):
        if integer and not isinstance(x, numbers.Integral):
            return None
        return int(x) if integer else float(x)
    if hasattr(x, "shape") and hasattr(x, "dtype") and tuple(x.shape) == ():
        dt = np.dtype(x.dtype)
        if np.issubdtype(dt, np.integer) or (not integer and np.issubdtype(dt, np.floating)):
            return int(x) if integer else float(x)
    return None


def _check_options(input_gate, normalize, scale, eps):
    """Checks the cell options; returns (scale, eps) as Python floats (scale may stay None)."""
    if input_gate not in INPUT_GATES:
        raise ValueError(f"input_gate: expected one of {INPUT_GATES}, got {input_gate!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize: expected a bool, got {normalize!r}")
    if input_gate == "exp" and not normalize:
        raise ValueError("normalize: normalize=False needs input_gate='sigmoid'; the exponential "
                         "input gate's output is only defined with the normaliser")
    if scale is not None:
        value = _real_scalar(scale)
        if value is None or not (math.isfinite(value) and value > 0):
            raise ValueError(f"scale: expected a finite real number > 0 or None, got {scale!r}")
        scale = value
    value = _real_scalar(eps)
    if value is None or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"eps: expected a finite real number >= 0, got {eps!r}")
    return scale, value


def _check_state(name, state, B, H, K, V):
    if not isinstance(state, MLSTMState):
        raise ValueError(f"{name}: expected an MLSTMState(c, n, m), got {type(state).__name__}")
    for field, want in (("c", (B, H, K, V)), ("n", (B, H, K)), ("m", (B, H))):
        x = getattr(state, field)
        _check_float(f"{name}.{field}", x)
        if tuple(x.shape) != want:
            raise ValueError(f"{name}.{field}: expected shape {want} (B, H{', K' if field != 'm' else ''}"
                             f"{', V' if field == 'c' else ''}), got {_describe(x)}")


def _check_qkvif(q, k, v, i, f, time_axis: bool):
    """Checks ranks and matching dims; returns (B, T, H, K, V) (T = 1 without a time axis)."""
    rank = 4 if time_axis else 3
    layout = "(B, T, H, D)" if time_axis else "(B, H, D)"
    for name, x in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        _check_float(name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != rank:
            raise ValueError(f"{name}: expected rank {rank} {layout}, got {_describe(x)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)} (K of q == K of k), "
                         f"got {_describe(k)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v: expected leading dims {tuple(q.shape[:-1])} matching q, got {_describe(v)}")
    for name, x in (("i", i), ("f", f)):
        if tuple(x.shape) != tuple(q.shape[:-1]):
            raise ValueError(f"{name}: expected gate shape {tuple(q.shape[:-1])} "
                             f"{layout.replace(', D', '')}, got {_describe(x)}")
    if time_axis:
        B, T, H, K = q.shape
        if T < 1:
            raise ValueError(f"q: expected T >= 1, got {_describe(q)}")
    else:
        (B, H, K), T = q.shape, 1
    if K < 1 or v.shape[-1] < 1:
        raise ValueError(f"q, v: head dims must be >= 1, got K={K}, V={v.shape[-1]}")
    return B, T, H, K, v.shape[-1]


def _segment_starts(segment_ids, B, T):
    """(B, T) bool, True where a position's id differs from the previous one's (None: None)."""
    if segment_ids is None:
        return None
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        raise ValueError(f"segment_ids: expected a (B, T) integer array or None, got "
                         f"{type(segment_ids).__name__}")
    if tuple(segment_ids.shape) != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids: expected an integer array of shape {(B, T)} (B, T of q), "
                         f"got {_describe(segment_ids)}")
    ids = jnp.asarray(segment_ids)
    return jnp.concatenate([jnp.zeros((B, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def _check_chunk_size(chunk_size):
    """Checks a chunk size; returns it as a Python int (or None)."""
    if chunk_size is None:
        return None
    value = _real_scalar(chunk_size, integer=True)
    if value is None or value < 1 or value & (value - 1):
        raise ValueError(f"chunk_size: expected a power-of-two int >= 1 or None, got {chunk_size!r}")
    return value


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Choosing the implementation
# ----------------------------------------------------------------------------------------------

def _device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except RuntimeError:
        return ""


class _Choice(NamedTuple):
    backend: backends.Backend | None   # None: an XLA implementation
    name: str
    config: Any


def _choose(implementation, config, chunk_size, call: backends.Call) -> _Choice:
    """The implementation of one call; raises ValueError naming the argument when it cannot run."""
    if implementation in XLA_IMPLEMENTATIONS:
        if config is not None:
            raise ValueError(f"config: a kernel config applies to kernel backends only, got "
                             f"implementation={implementation!r}")
        return _Choice(None, implementation, None)
    if implementation is None and not (call.platform == "gpu" or call.interpret):
        return _Choice(None, "chunkwise", None)  # a kernel config is moot where kernels cannot run
    if implementation in (None, "pallas"):
        candidates = sorted(backends.kernel_backends(), key=lambda b: b.rank(call))
    else:
        candidates = [backends.get_backend(implementation)]
    reasons = []
    for backend in candidates:
        if config is not None and not isinstance(config, backend.config_cls):
            if implementation not in (None, "pallas"):
                raise ValueError(f"config: implementation={backend.name!r} takes a "
                                 f"{backend.config_cls.__name__}, got {type(config).__name__}")
            reasons.append(f"{backend.name}: config is not a {backend.config_cls.__name__}")
            continue
        cfg = _backend_config(backend, config, chunk_size, call)
        reason = backend.supported(call, cfg)
        if reason is None:
            return _Choice(backend, backend.name, cfg)
        reasons.append(f"{backend.name}: {reason}")
    if implementation is None:
        return _Choice(None, "chunkwise", None)   # None never fails on a supported input
    raise ValueError(f"implementation: {implementation!r} cannot run this call ("
                     + "; ".join(reasons) + "); use implementation=None or 'chunkwise'")


def _backend_config(backend, config, chunk_size, call):
    if config is None:
        return backend.default_config(call, chunk_size=chunk_size)
    if chunk_size is not None and chunk_size != backend.chunk_size(config):
        raise ValueError(f"chunk_size: {chunk_size} disagrees with the config's chunk size "
                         f"{backend.chunk_size(config)}; pass one of them")
    return config


# ----------------------------------------------------------------------------------------------
# A kernel needs a GPU: a clear error where it is lowered for another platform
# ----------------------------------------------------------------------------------------------

_gpu_only_p = jex_core.Primitive("tfla_gpu_only")
_gpu_only_p.def_impl(lambda x, *, name: x)
_gpu_only_p.def_abstract_eval(lambda x, *, name: x)
batching.primitive_batchers[_gpu_only_p] = lambda args, dims, **kw: (_gpu_only_p.bind(*args, **kw), dims[0])


def _reject_lowering(ctx, x, *, name):
    raise ValueError(f"implementation: {name!r} runs compiled on a GPU only, and this computation "
                     f"is being compiled for {ctx.module_context.platforms}; pass interpret=True "
                     "to run the kernels on a CPU (slow, for testing), or use implementation=None "
                     "(the fastest available) or 'chunkwise'")


mlir.register_lowering(_gpu_only_p, _reject_lowering)
for _platform in ("cuda", "rocm"):
    mlir.register_lowering(_gpu_only_p, lambda ctx, x, *, name: [x], platform=_platform)


# ----------------------------------------------------------------------------------------------
# The kernel path: padding, gate vectors, the one custom_vjp
# ----------------------------------------------------------------------------------------------

class _KernelStatic(NamedTuple):
    """The static part of a kernel call (hashable: the nondiff argument of the custom_vjp)."""

    backend: str
    config: Any
    input_gate: str
    normalize: bool
    scale: float
    eps: float
    interpret: bool


@functools.partial(jax.jit, static_argnames=("static",))
def _kernel_path(q, k, v, i, f, c0, n0, m0, seg_start, *, static: _KernelStatic):
    B, T, H, K = q.shape
    V = v.shape[-1]
    backend = backends.get_backend(static.backend)
    c0 = jnp.zeros((B, H, K, V), jnp.float32) if c0 is None else c0.astype(jnp.float32)
    n0 = jnp.zeros((B, H, K), jnp.float32) if n0 is None else n0.astype(jnp.float32)
    m0 = (jnp.zeros((B, H), jnp.float32) if m0 is None or static.input_gate != "exp"
          else m0.astype(jnp.float32))
    # Padding stays outside the custom_vjp: its transpose (slicing the pads off) is automatic.
    L = backend.chunk_size(static.config)
    args = _match_vma(*ref.pad_to_chunks(q, k, v, i, f, L), c0, n0, m0)
    h, (c_T, n_T, m_T) = _mlstm_kernel(*args, ref.pad_starts(seg_start, L), static)
    return h[:, :T], MLSTMState(c_T, n_T, m_T)


def _match_vma(*arrays):
    """Inside shard_map, makes every array vary over the union of the arrays' mesh axes, so that
    one input's type describes every kernel output (a no-op outside shard_map)."""
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in arrays))
    out = []
    for x in arrays:
        missing = tuple(sorted(axes - jax.typeof(x).manual_axis_type.varying))
        out.append(lax.pcast(x, missing, to="varying") if missing else x)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _mlstm_kernel(q, k, v, i, f, c0, n0, m0, seg_start, static):
    """A kernel backend's forward on whole chunks: (h, (c_T, n_T, m_T)). seg_start: None or
    (B, T) bool (packed sequences; the kernels see it only through the gate vectors)."""
    out, _ = _mlstm_kernel_fwd(q, k, v, i, f, c0, n0, m0, seg_start, static, residuals=False)
    return out


def _mlstm_kernel_fwd(q, k, v, i, f, c0, n0, m0, seg_start, static, residuals=True):
    backend = backends.get_backend(static.backend)
    gt = ref.gate_rows(i, f, chunk_size=backend.chunk_size(static.config),
                       input_gate=static.input_gate, m0=m0, scale=static.scale,
                       seg_start=seg_start)
    if backend.gpu_only and not static.interpret:
        q = _gpu_only_p.bind(q, name=static.backend)
    out = backend.forward(q, k, v, gt, c0, n0, config=static.config, normalize=static.normalize,
                          eps=static.eps, interpret=static.interpret, residuals=residuals)
    final = (out.c_T, out.n_T, gt.m_states[..., -1])
    return (out.h, final), (q, k, v, i, f, c0, n0, m0, seg_start, gt, out.h, out.den,
                            out.states)


def _mlstm_kernel_bwd(static, saved, cotangents):
    q, k, v, i, f, c0, n0, m0, seg_start, gt, h, den, states = saved
    dh, (dc_T, dn_T, _) = cotangents  # m_T's cotangent is implied by (c_T, n_T): m is constant
    backend = backends.get_backend(static.backend)
    B, T, H, _ = q.shape
    L = backend.chunk_size(static.config)
    dh, dc_T, dn_T = _match_vma(dh, dc_T, dn_T, q)[:3]
    if static.normalize:
        inv_n = 1.0 / (jnp.maximum(jnp.abs(den), gt.floor) + static.eps)
        dh_h = jnp.einsum("bthv,bthv->bht", dh.astype(jnp.float32), h.astype(jnp.float32))
        dden = jnp.where(jnp.abs(den) > gt.floor, -dh_h * inv_n * jnp.sign(den), 0.0)
    else:
        inv_n = jnp.ones_like(den)
        dden = jnp.zeros_like(den)
    g = backend.backward(q, k, v, gt, c0, n0, h, dh, dc_T, dn_T,
                         backends.NormTerms(inv_n, dden), states, config=static.config,
                         interpret=static.interpret)
    # Gate gradients (docs/math.md): d log i_t = k_t . dk_t and, for t in chunk c,
    # d F_t = sum_{t <= t' in c} r_t' + sum_{s < t in c} kdk_inter_s + zc_c: only the pairs that
    # cross t, without sums of large cancelling terms.
    per_chunk = lambda x: x.reshape(B, H, T // L, L)  # noqa: E731
    inter = per_chunk(g.kdk_inter)
    inter_before = lax.cumsum(jnp.concatenate([jnp.zeros_like(inter[..., :1]), inter[..., :-1]],
                                              axis=-1), axis=3)
    dF = lax.cumsum(per_chunk(g.r), axis=3, reverse=True) + inter_before + g.zc[..., None]
    rows = lambda x: jnp.swapaxes(x.reshape(B, H, T), 1, 2)  # noqa: E731  (B, H, T) -> (B, T, H)

    def log_gates(i, f):
        return (gates.log_input_gate(i.astype(jnp.float32), static.input_gate),
                gates.log_forget_gate(f.astype(jnp.float32)))

    F = log_gates(i, f)[1]
    reset = F <= gates.RESET_LOG_F                           # a reset does not depend on F
    if seg_start is not None:
        reset = reset | seg_start[..., None]
    dF = jnp.where(reset, 0.0, rows(dF))
    di, df = jax.vjp(log_gates, i, f)[1]((rows(g.kdk), dF))
    if static.input_gate == "exp":
        dm0 = jnp.sum(g.dc0 * c0, axis=(-2, -1)) + jnp.sum(g.dn0 * n0, axis=-1)
    else:
        dm0 = jnp.zeros_like(m0)
    return (g.dq, g.dk, g.dv, di.astype(i.dtype), df.astype(f.dtype), g.dc0, g.dn0, dm0, None)


_mlstm_kernel.defvjp(_mlstm_kernel_fwd, _mlstm_kernel_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def mlstm(q, k, v, i, f, *, input_gate="exp", normalize=True, initial_state=None,
          return_state=False, scale=None, eps=1e-6, chunk_size=None, implementation=None,
          interpret=None, config=None, segment_ids=None, context_axis=None):
    """The mLSTM cell over a sequence (xLSTM matrix memory), layout (B, T, H, D).

    Args:
      q, k: (B, T, H, K) queries and keys; v: (B, T, H, V) values (one dtype: bf16/fp16/fp32/fp64).
      i, f: (B, T, H) raw input- and forget-gate pre-activations i~, f~ (any float dtype).
      input_gate: "exp" (mLSTMexp, stabilised; xLSTM 7B) or "sigmoid" (mLSTMsig).
      normalize: divide by max(|q.n|, floor) + eps; False only with input_gate="sigmoid".
      initial_state: optional MLSTMState (c (B,H,K,V), n (B,H,K), m (B,H)); zeros by default.
      return_state: also return the final MLSTMState (float32; float64 for float64 inputs).
      scale: query scale > 0, default K**-0.5 (only q is scaled). eps: added to the denominator.
      chunk_size: power-of-two chunk length L for "chunkwise" and the kernel backends.
      implementation: None (the fastest available: a kernel backend on GPU, else "chunkwise";
        never fails on a supported input), "recurrent" (lax.scan, the ground truth), "parallel",
        "chunkwise", "pallas" (the fastest kernel backend that supports the call) or a kernel
        backend by name (`tfla_jax.available_backends()`, e.g. "pallas_triton").
      interpret: run the kernels in Pallas interpret mode (CPU testing); default off.
      config: the kernel backend's config (e.g. `tfla_jax.TritonConfig`).
      segment_ids: optional (B, T) integers for packed sequences: a position whose id differs
        from the previous position's starts a new sequence from the zero state (only changes
        matter; ids need not be sorted or distinct across a row). initial_state applies to each
        row's first sequence, the final state is that of its last.
      context_axis: context parallelism (docs/context_parallel.md). The name of a mesh axis of an
        enclosing `jax.shard_map` over which T is split, device d of the axis holding the d-th
        contiguous block of positions: every array here is that device's block (T local),
        initial_state is replicated and enters the first block, the returned final state is the
        state after the whole sequence, the same on every device. Moves O(K V) per head.

    Returns:
      (h, state): h (B, T, H, V) in v's dtype; state the final MLSTMState if return_state else None.

    Math (docs/math.md): C_t = f_t C_{t-1} + i_t k_t v_t^T, n_t = f_t n_{t-1} + i_t k_t,
    h_t = C_t^T q^_t / (max(|n_t . q^_t|, 1) + eps e^{m_t}) in unstabilised units, q^ = scale q.
    """
    B, T, H, K, V = _check_qkvif(q, k, v, i, f, time_axis=True)
    scale, eps = _check_options(input_gate, normalize, scale, eps)
    chunk_size = _check_chunk_size(chunk_size)
    if initial_state is not None:
        _check_state("initial_state", initial_state, B, H, K, V)
    seg_start = _segment_starts(segment_ids, B, T)
    context_size = None if context_axis is None else context.check_axis(context_axis)
    if implementation is not None and implementation not in implementations():
        raise ValueError(f"implementation: expected None or one of {implementations()}, "
                         f"got {implementation!r}")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret: expected a bool or None, got {interpret!r}")
    if config is not None and not any(isinstance(config, b.config_cls)
                                      for b in backends.kernel_backends()):
        raise ValueError(f"config: expected a kernel backend's config (e.g. tfla_jax.TritonConfig)"
                         f" or None, got {type(config).__name__}")
    call = backends.Call(B=B, T=T, H=H, K=K, V=V, dtype=jnp.dtype(q.dtype),
                         input_gate=input_gate, normalize=normalize,
                         platform=jax.default_backend(), device_kind=_device_kind(),
                         interpret=bool(interpret))
    if jnp.dtype(q.dtype) == jnp.float64 and implementation in (None, "pallas"):
        implementation = "chunkwise"  # no float64 kernels: the XLA form is exact in float64
    choice = _choose(implementation, config, chunk_size, call)
    scale = K ** -0.5 if scale is None else float(scale)
    opts = dict(input_gate=input_gate, normalize=normalize, scale=scale, eps=float(eps))

    def run_block(q, k, v, i, f, initial_state, seg_start):
        if choice.name == "recurrent":
            return _recurrent(q, k, v, i, f, initial_state=initial_state, seg_start=seg_start,
                              **opts)
        if choice.name == "parallel":
            return _parallel(q, k, v, i, f, initial_state=initial_state, seg_start=seg_start,
                             **opts)
        if choice.name == "chunkwise":
            L = chunk_size or min(DEFAULT_CHUNK_SIZE_XLA, _next_pow2(T))
            return _chunkwise(q, k, v, i, f, initial_state=initial_state, chunk_size=L,
                              seg_start=seg_start, **opts)
        c0, n0, m0 = initial_state if initial_state is not None else (None, None, None)
        static = _KernelStatic(choice.name, choice.config, interpret=bool(interpret), **opts)
        return _kernel_path(q, k, v, i, f, c0, n0, m0, seg_start, static=static)

    if context_axis is None:
        h, state = run_block(q, k, v, i, f, initial_state, seg_start)
    else:
        h, state = context.mlstm_context(
            run_block, q, k, v, i, f, initial_state=initial_state, seg_start=seg_start,
            segment_ids=segment_ids, input_gate=input_gate, return_state=return_state,
            axis=context_axis, size=context_size)
    return h, (state if return_state else None)


def mlstm_step(q, k, v, i, f, state=None, *, input_gate="exp", normalize=True, scale=None,
               eps=1e-6):
    """One decoding step. q, k: (B, H, K); v: (B, H, V); i, f: (B, H); state: MLSTMState or None.

    Returns (h (B, H, V) in v's dtype, new MLSTMState in float32). Equals `mlstm` at T = 1.
    """
    B, _, H, K, V = _check_qkvif(q, k, v, i, f, time_axis=False)
    scale, eps = _check_options(input_gate, normalize, scale, eps)
    if state is None:
        state = ref.zero_state(B, H, K, V, gates.compute_dtype(q, k, v, i, f))
    _check_state("state", state, B, H, K, V)
    return _step(q, k, v, i, f, state, input_gate=input_gate, normalize=normalize,
                              scale=scale, eps=float(eps))
