"""`mlstm_pallas`: any-T host entry of the TFLA Pallas kernels (called by `tfla_jax.mlstm`)."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tfla_jax import ref
from tfla_jax.pallas.config import MIN_BLOCK, TilingConfig
from tfla_jax.pallas.bwd import mlstm_bwd
from tfla_jax.pallas.common import initial_state_f32, match_vma
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
    """mLSTM through the TFLA Pallas kernels, any T (padded to whole chunks), differentiable.

    q, k: (B, T, H, K); v: (B, T, H, V) (bf16 / fp16 / fp32); i, f: (B, T, H) raw gates;
    initial_state: MLSTMState or None. Returns (h (B, T, H, V) in v's dtype, final MLSTMState).
    Gradients (custom_vjp) run the backward kernels; chunk states are recomputed there unless
    config.keep_states.
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
    B, T, H, K = q.shape
    V = v.shape[-1]
    c0, n0, m0 = initial_state_f32(c0, n0, m0, B, H, K, V, exp_gate=True)
    # Padding stays outside the custom_vjp: its transpose (slicing the pads off) is automatic.
    qp, kp, vp, ip, fp = ref.pad_to_chunks(q, k, v, i, f, config.chunk_size)
    qp, kp, vp, ip, fp, c0, n0, m0 = match_vma(qp, kp, vp, ip, fp, c0, n0, m0)
    opts = _KernelOptions(input_gate, normalize, scale, eps, config, interpret)
    h, (c_T, n_T, m_T) = _mlstm_core(qp, kp, vp, ip, fp, c0, n0, m0, opts)
    return h[:, :T], MLSTMState(c_T, n_T, m_T)


class _KernelOptions(NamedTuple):
    """The static options of one kernel call (hashable: a nondiff argument of the custom_vjp)."""

    input_gate: str
    normalize: bool
    scale: float | None
    eps: float
    config: TilingConfig
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _mlstm_core(q, k, v, i, f, c0, n0, m0, opts):
    """TFLA forward on whole chunks: (h, (c_T, n_T, m_T)); the backward is `mlstm_bwd`."""
    h, final, _ = mlstm_fwd(q, k, v, i, f, c0, n0, m0, **opts._asdict())
    return h, final


def _mlstm_core_fwd(q, k, v, i, f, c0, n0, m0, opts):
    keep = opts.config.keep_states
    h, final, residuals = mlstm_fwd(q, k, v, i, f, c0, n0, m0, return_states=keep,
                                    **opts._asdict())
    return (h, final), (q, k, v, i, f, c0, n0, m0, h, residuals)


def _mlstm_core_bwd(opts, saved, cotangents):
    q, k, v, i, f, c0, n0, m0, h, residuals = saved
    dh, (dc_T, dn_T, _) = cotangents  # m_T's cotangent is implied by (c_T, n_T): m is constant
    den, m_row, *states = residuals
    q, k, v, i, f, c0, n0, m0, h, dh, dc_T, dn_T = match_vma(q, k, v, i, f, c0, n0, m0, h, dh,
                                                             dc_T, dn_T)
    return mlstm_bwd(q, k, v, i, f, c0, n0, m0, h, den, m_row, dh, dc_T, dn_T,
                     states=tuple(states) or None, **opts._asdict())


_mlstm_core.defvjp(_mlstm_core_fwd, _mlstm_core_bwd)
