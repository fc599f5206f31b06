"""The Pallas-Triton kernel backend ("pallas_triton"): TFLA on the Triton lowering of Pallas.

Six kernels (docs/kernels.md): the chunk-state recurrence and its reverse (states.py), the
forward output (fwd.py), dq / dk / dv (bwd.py). Runs on any GPU the Triton lowering supports,
bf16 / fp16 / fp32, any head dims (zero-padded to a multiple of 16), chunk sizes >= 16.
"""

import jax.numpy as jnp

from tfla_jax.backends.base import Backend, Call, ForwardOut, KernelGrads, register
from tfla_jax.backends.triton.bwd import intra_dk, intra_dq, intra_dv
from tfla_jax.backends.triton.common import F32, pad_last
from tfla_jax.backends.triton.config import MIN_BLOCK, TritonConfig, padded_head_dim
from tfla_jax.backends.triton.fwd import chunk_output
from tfla_jax.backends.triton.states import chunk_states, state_grads

_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))


class TritonBackend(Backend):
    name = "pallas_triton"
    config_cls = TritonConfig
    speed_rank = 10

    def default_config(self, call: Call, chunk_size=None):
        return TritonConfig.default(call.K, call.V, call.T, call.dtype, call.input_gate,
                                    chunk_size=chunk_size, device_kind=call.device_kind)

    def chunk_size(self, config):
        return config.chunk_size

    def supported(self, call: Call, config):
        if jnp.dtype(call.dtype) not in _DTYPES:
            return f"dtype {jnp.dtype(call.dtype).name}: the Triton kernels take bf16, fp16, fp32"
        if config.chunk_size < MIN_BLOCK:
            return f"chunk_size {config.chunk_size}: Triton dots need every dim >= {MIN_BLOCK}"
        return None

    def forward(self, q, k, v, gates, c0, n0, *, config, normalize, eps, interpret, residuals):
        K, V = q.shape[-1], v.shape[-1]
        cfg = config.resolve(K, V)
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        q, k, v = pad_last(q, Kp), pad_last(k, Kp), pad_last(v, Vp)
        c_states, n_states, c_last = chunk_states(k, v, gates.w_state, gates.decay,
                                                  pad_last(c0, Kp, Vp), pad_last(n0, Kp),
                                                  config=cfg, interpret=interpret)
        h, den = chunk_output(q, k, v, gates, c_states, n_states, config=cfg,
                              normalize=normalize, eps=eps, interpret=interpret)
        keep = residuals and cfg.keep_states
        return ForwardOut(h[..., :V], den, c_last[..., :K, :V], n_states[:, :, -1, :K],
                          states=(c_states, n_states, c_last) if keep else None)

    def backward(self, q, k, v, gates, c0, n0, h, dh, dc_T, dn_T, norm, states, *, config,
                 interpret):
        K = q.shape[-1]
        V = v.shape[-1]
        cfg = config.resolve(K, V)
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        qp, kp, vp = pad_last(q, Kp), pad_last(k, Kp), pad_last(v, Vp)
        dc_T, dn_T = pad_last(dc_T.astype(F32), Kp, Vp), pad_last(dn_T.astype(F32), Kp)
        if states is None:
            states = chunk_states(kp, vp, gates.w_state, gates.decay, pad_last(c0, Kp, Vp),
                                  pad_last(n0, Kp), config=cfg, interpret=interpret)
        dc_states, dn_states, dc_first, zc = state_grads(
            qp, pad_last(dh.astype(v.dtype), Vp), gates.w_inter * norm.inv_n,
            gates.w_inter * norm.dden, gates.decay, states[0], dc_T, dn_T, config=cfg,
            interpret=interpret)
        return self.intra_grads(q, k, v, dh, gates, norm, states, (dc_states, dn_states, dc_first),
                                jnp.sum(zc, axis=(2, 3)), config=config, interpret=interpret)

    def intra_grads(self, q, k, v, dh, gates, norm, states, state_cots, zc, *, config,
                    interpret, dq=None, dk=None, dv=None):
        """dq, dk, dv and the gate-gradient pieces (`KernelGrads`) from the chunk states and
        their cotangents, both padded to this backend's head dims. Given by the caller: dv,
        dq as (dq, q . dq without the diagonal term), dk as (dk, kdk_off, kdk_inter, kdk), the
        row dots (B, H, T) as `KernelGrads` names them.

        states: (C (B, H, NC+1, K, V), n (B, H, NC+1, K), C_T); state_cots: (dC like C, dn like
        n, dC_0 (B, H, K, V)); C and dC in `state_dtype`; zc (B, H, NC): decay_c <C_c, dC_{c+1}>.
        """
        K, V = q.shape[-1], v.shape[-1]
        cfg = config.resolve(K, V)
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        q, k, v = pad_last(q, Kp), pad_last(k, Kp), pad_last(v, Vp)
        dh = pad_last(dh.astype(v.dtype), Vp)
        c_states, n_states, _ = states
        dc_states, dn_states, dc_first = state_cots
        rows = dict(bh=gates.bh, row=gates.row, col=gates.col, start=gates.start,
                    w_inter=gates.w_inter, w_state=gates.w_state, inv_n=norm.inv_n,
                    dden=norm.dden)
        opts = dict(config=cfg, interpret=interpret)
        if dq is None:
            dq, qdq_off = intra_dq(q, k, v, dh, rows, c_states, n_states, **opts)
            qdq_off = jnp.sum(qdq_off, axis=2)
        else:
            dq, qdq_off = dq
        if dk is None:
            dk, *dots = intra_dk(q, k, v, dh, rows, dc_states, dn_states, **opts)
            dk = (dk, *(jnp.sum(x, axis=2) for x in dots))   # over K tiles
        dk, kdk_off, kdk_inter, kdk = dk
        if dv is None:
            dv = intra_dv(q, k, v, dh, rows, dc_states, **opts)
        # decay_c (<C_c, dC_{c+1}> + <n_c, dn_{c+1}>) per chunk.
        zc = zc + gates.decay * jnp.sum(n_states[:, :, :-1] * dn_states[:, :, 1:], axis=-1)
        return KernelGrads(dq[..., :K], dk[..., :K], dv[..., :V], r=qdq_off - kdk_off,
                           kdk_inter=kdk_inter, kdk=kdk, zc=zc,
                           dc0=dc_first[..., :K, :V], dn0=dn_states[:, :, 0, :K])


BACKEND = register(TritonBackend())

__all__ = ["BACKEND", "TritonBackend", "TritonConfig"]
