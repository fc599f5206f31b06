"""Public mLSTM entry points: input checks, implementation dispatch and the kernel glue."""

import math

import jax
import jax.numpy as jnp

from tfla_jax import pallas, ref
from tfla_jax.state import MLSTMState

IMPLEMENTATIONS = ("recurrent", "parallel", "chunkwise", "pallas")
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


def _check_options(input_gate, normalize, scale, eps):
    if input_gate not in INPUT_GATES:
        raise ValueError(f"input_gate: expected one of {INPUT_GATES}, got {input_gate!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize: expected a bool, got {normalize!r}")
    if input_gate == "exp" and not normalize:
        raise ValueError("normalize: normalize=False needs input_gate='sigmoid'; the exponential "
                         "input gate's output is only defined with the normaliser")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite Python float or None, got {scale!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")


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


def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size: expected a power-of-two int >= 1 or None, got {chunk_size!r}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pallas_available() -> bool:
    return jax.default_backend() == "gpu"


def mlstm(q, k, v, i, f, *, input_gate="exp", normalize=True, initial_state=None,
          return_state=False, scale=None, eps=1e-6, chunk_size=None, implementation=None,
          interpret=None, config=None):
    """The mLSTM cell over a sequence (xLSTM matrix memory), layout (B, T, H, D).

    Args:
      q, k: (B, T, H, K) queries and keys; v: (B, T, H, V) values (one dtype: bf16/fp16/fp32/fp64).
      i, f: (B, T, H) raw input- and forget-gate pre-activations i~, f~ (any float dtype).
      input_gate: "exp" (mLSTMexp, stabilised; xLSTM 7B) or "sigmoid" (mLSTMsig).
      normalize: divide by max(|q.n|, floor) + eps; False only with input_gate="sigmoid".
      initial_state: optional MLSTMState (c (B,H,K,V), n (B,H,K), m (B,H)); zeros by default.
      return_state: also return the final MLSTMState (float32; float64 for float64 inputs).
      scale: query scale, default K**-0.5 (only q is scaled). eps: added to the denominator.
      chunk_size: power-of-two chunk length L for "chunkwise"/"pallas" (default per implementation).
      implementation: None (fastest available: "pallas" on GPU, else "chunkwise"), "recurrent",
        "parallel", "chunkwise" or "pallas".
      interpret: run the Pallas kernels in interpret mode (CPU testing); default off.
      config: a `tfla_jax.TilingConfig` overriding the tiling of the Pallas kernels.

    Returns:
      (h, state): h (B, T, H, V) in v's dtype; state the final MLSTMState if return_state else None.

    Math: C_t = f_t C_{t-1} + i_t k_t v_t^T, n_t = f_t n_{t-1} + i_t k_t,
    h_t = C_t^T q_t / (max(|n_t . q_t|, 1) + eps) in unstabilised units.
    """
    B, T, H, K, V = _check_qkvif(q, k, v, i, f, time_axis=True)
    _check_options(input_gate, normalize, scale, eps)
    _check_chunk_size(chunk_size)
    if initial_state is not None:
        _check_state("initial_state", initial_state, B, H, K, V)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected None or one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if config is not None and not isinstance(config, pallas.TilingConfig):
        raise ValueError(f"config: expected a tfla_jax.TilingConfig or None, "
                         f"got {type(config).__name__}")
    if config is not None and implementation not in (None, "pallas"):
        raise ValueError(f"config: a tiling config applies to implementation='pallas' only, "
                         f"got implementation={implementation!r}")
    if implementation is None:  # a config for the kernels is ignored where they cannot run
        implementation = "pallas" if (_pallas_available() or interpret) else "chunkwise"
    scale = K ** -0.5 if scale is None else float(scale)
    opts = dict(input_gate=input_gate, normalize=normalize, initial_state=initial_state,
                scale=scale, eps=float(eps))
    if implementation == "recurrent":
        h, state = _recurrent(q, k, v, i, f, **opts)
    elif implementation == "parallel":
        h, state = _parallel(q, k, v, i, f, **opts)
    elif implementation == "chunkwise":
        L = chunk_size or min(DEFAULT_CHUNK_SIZE_XLA, _next_pow2(T))
        h, state = _chunkwise(q, k, v, i, f, chunk_size=L, **opts)
    else:
        if not (_pallas_available() or interpret):
            raise ValueError("implementation: 'pallas' needs a GPU backend "
                             f"(found {jax.default_backend()!r}); pass interpret=True to run it "
                             "on CPU, or use 'chunkwise'")
        h, state = pallas.mlstm_pallas(q, k, v, i, f, chunk_size=chunk_size, config=config,
                                       interpret=bool(interpret), **opts)
    return h, (state if return_state else None)


def mlstm_step(q, k, v, i, f, state=None, *, input_gate="exp", normalize=True, scale=None,
               eps=1e-6):
    """One decoding step. q, k: (B, H, K); v: (B, H, V); i, f: (B, H); state: MLSTMState or None.

    Returns (h (B, H, V) in v's dtype, new MLSTMState in float32). Equals `mlstm` at T = 1.
    """
    B, _, H, K, V = _check_qkvif(q, k, v, i, f, time_axis=False)
    _check_options(input_gate, normalize, scale, eps)
    if state is None:
        state = ref.zero_state(B, H, K, V, ref.gates.compute_dtype(q, k, v, i, f))
    _check_state("state", state, B, H, K, V)
    return _step(q, k, v, i, f, state, input_gate=input_gate, normalize=normalize,
                              scale=scale, eps=float(eps))
