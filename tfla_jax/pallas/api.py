"""`mlstm_pallas`: any-T host entry of the TFLA Pallas kernels (called by `tfla_jax.mlstm`)."""

import functools

import jax
import jax.numpy as jnp

from tfla_jax import ref
from tfla_jax.pallas.config import MIN_BLOCK, TilingConfig
from tfla_jax.pallas.fwd import mlstm_fwd
from tfla_jax.state import MLSTMState


def resolve_config(config, chunk_size, K, V, T, dtype, input_gate) -> TilingConfig:
    """The tiling for one call: `config`, else the measured default; `chunk_size` overrides L."""
    if chunk_size is not None and chunk_size < MIN_BLOCK:
        raise ValueError(f"chunk_size: implementation='pallas' needs a chunk size >= {MIN_BLOCK} "
                         f"(Triton dots need every dim >= 16), got {chunk_size}")
    if config is None:
        config = TilingConfig.default(K, V, T, dtype, input_gate, chunk_size=chunk_size)
    elif not isinstance(config, TilingConfig):
        raise ValueError(f"config: expected a tfla_jax.pallas.TilingConfig or None, "
                         f"got {type(config).__name__}")
    elif chunk_size is not None and chunk_size != config.chunk_size:
        raise ValueError(f"chunk_size: {chunk_size} disagrees with config.chunk_size="
                         f"{config.chunk_size}; pass one of them")
    return config.resolve(K, V)


def mlstm_pallas(q, k, v, i, f, *, input_gate="exp", normalize=True, initial_state=None,
                 scale=None, eps=1e-6, chunk_size=None, config=None, interpret=False):
    """mLSTM forward through the TFLA Pallas kernels, any T (padded to whole chunks).

    q, k: (B, T, H, K); v: (B, T, H, V) (bf16 / fp16 / fp32); i, f: (B, T, H) raw gates;
    initial_state: MLSTMState or None. Returns (h (B, T, H, V) in v's dtype, final MLSTMState).
    float64 inputs run the pure-JAX chunkwise path (no float64 kernels).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if q.dtype == jnp.float64:
        return ref.mlstm_chunkwise(q, k, v, i, f, input_gate=input_gate, normalize=normalize,
                                   initial_state=initial_state, scale=scale, eps=eps,
                                   chunk_size=chunk_size or 64)
    config = resolve_config(config, chunk_size, K, V, T, q.dtype, input_gate)
    c0 = n0 = m0 = None
    if initial_state is not None:
        c0, n0, m0 = initial_state
    return _mlstm_pallas(q, k, v, i, f, c0, n0, m0, input_gate=input_gate, normalize=normalize,
                         scale=scale, eps=float(eps), config=config, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("input_gate", "normalize", "scale", "eps", "config",
                                             "interpret"))
def _mlstm_pallas(q, k, v, i, f, c0, n0, m0, *, input_gate, normalize, scale, eps, config,
                  interpret):
    T = q.shape[1]
    qp, kp, vp, ip, fp = ref.pad_to_chunks(q, k, v, i, f, config.chunk_size)
    h, (c_T, n_T, m_T), _ = mlstm_fwd(qp, kp, vp, ip, fp, c0, n0, m0, input_gate=input_gate,
                                       normalize=normalize, scale=scale, eps=eps,
                                       config=config, interpret=interpret)
    return h[:, :T], MLSTMState(c_T, n_T, m_T)
