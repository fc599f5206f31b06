"""The Pallas Mosaic GPU kernel backend ("pallas_mosaic_gpu"): TFLA for Hopper (sm90).

TMA loads into swizzled shared memory, wgmma with 16-bit operands and float32 accumulators, the
gated score tile kept in registers as the A operand of the second matmul (docs/kernels.md).
Kernels: the chunk-state recurrence (states.py, with n alongside), the warp-specialised
forward output (fwd.py), which also runs transposed for dv, and dq / dk (bwd.py); the backward
runs the reverse state recurrence on the same state kernel, and for bf16 dv, dq and dk on these
kernels (dk with unpadded head dims, dq where it rounds dA like dk: `MosaicConfig`); the rest of
dq / dk / dv (fp16, padded head dims) on the Triton backend's. bf16 and fp16 inputs, head
dims padded to multiples of 64, K <= 256, chunk sizes 128 and 256, Hopper GPUs; other calls are
declined (the Triton backend takes them).
"""

import jax.numpy as jnp

from tfla_jax.backends.base import Backend, Call, ForwardOut, register
from tfla_jax.backends.mosaic.config import (MAX_CHUNK, MAX_K, MIN_CHUNK, MosaicConfig,
                                             padded_head_dim)
from tfla_jax.backends.mosaic.bwd import chunk_dk, chunk_dq, score_block
from tfla_jax.backends.mosaic.common import STATE_DTYPE
from tfla_jax.backends.mosaic.fwd import chunk_dv, chunk_output
from tfla_jax.backends.mosaic.states import state_recurrence
from tfla_jax.backends.triton import BACKEND as TRITON, TritonConfig
from tfla_jax.backends.triton.common import pad_last, state_dtype
from tfla_jax.backends.triton.config import padded_head_dim as triton_padded_head_dim

_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16))


class MosaicBackend(Backend):
    name = "pallas_mosaic_gpu"
    config_cls = MosaicConfig
    # Ahead of pallas_triton where it runs: measured faster on an H200 (forward 2.35 vs 3.44 ms at
    # the headline shape, forward+backward equal) and checked compiled there (tests/test_gpu.py).
    speed_rank = 5
    interpretable = False  # bf16/fp16 only; CPU tests: tests/test_mosaic.py, cross-lowering

    def rank(self, call: Call):
        # Measured on an H200 at 65,536 tokens (benchmarks/README.md): with V <= 128 the Triton
        # forward is faster (K = V = 128: 0.97 vs 1.05 ms); from V = 256 on this one is.
        return self.speed_rank if padded_head_dim(call.V) > 128 else 15

    def default_config(self, call: Call, chunk_size=None):
        return MosaicConfig.default(call.K, call.V, call.T, call.dtype, chunk_size=chunk_size,
                                    heads=call.B * call.H)

    def chunk_size(self, config):
        return config.chunk_size

    def supported(self, call: Call, config):
        if call.interpret:
            return ("interpret=True: the Mosaic GPU interpreter runs each warpgroup as a "
                    "blocking XLA CPU computation and hangs with fewer CPU threads than "
                    "warpgroups (tests/test_mosaic.py interprets the kernels with PJRT_NPROC "
                    "set)")
        if jnp.dtype(call.dtype) not in _DTYPES:
            return f"dtype {jnp.dtype(call.dtype).name}: the wgmma kernels take bf16 or fp16"
        if padded_head_dim(call.K) > MAX_K:
            return (f"K={call.K}: the output kernel holds q and C_c in shared memory for "
                    f"K <= {MAX_K}")
        if config.chunk_size < MIN_CHUNK:
            return (f"chunk_size {config.chunk_size}: a CTA of the output kernel covers "
                    f"{MIN_CHUNK} query rows of one chunk")
        if config.chunk_size > MAX_CHUNK:
            return (f"chunk_size {config.chunk_size}: the output kernel loads a chunk's gate "
                    f"vectors in one TMA copy of at most {MAX_CHUNK} elements")
        if not call.interpret and call.platform == "gpu" and call.device_kind and not any(
                s in call.device_kind for s in ("H100", "H200", "H800", "H20", "GH200")):
            return f"device {call.device_kind!r}: wgmma and TMA need a Hopper GPU (sm90)"
        return None

    def forward(self, q, k, v, gates, c0, n0, *, config, normalize, eps, interpret, residuals):
        K, V = q.shape[-1], v.shape[-1]
        cfg = config.resolve(K, V)
        L = cfg.chunk_size
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        q, k, v = pad_last(q, Kp), pad_last(k, Kp), pad_last(v, Vp)
        c0p, n0p = pad_last(c0, Kp, Vp), pad_last(n0, Kp)
        c_states, n_states, c_last = state_recurrence(
            k, v, gates.w_state, gates.w_state, gates.decay, c0p, n0p, reverse=False,
            chunk_size=L, block_t=cfg.states_block_t, block_k=cfg.states_block_k,
            block_v=cfg.states_block_v, max_steps=cfg.states_stages,
            warpgroups=cfg.states_warpgroups, interpret=interpret)
        rows = dict(bh=gates.bh, row=gates.row, start=gates.start, w_inter=gates.w_inter,
                    floor=gates.floor)
        h, den = chunk_output(q, k, v, c_states, n_states, rows,
                              dict(bh=gates.bh, col=gates.col), chunk_size=L,
                              normalize=normalize, eps=eps, block_v=cfg.block_v,
                              interpret=interpret)
        keep = residuals and cfg.keep_states
        return ForwardOut(h[..., :V], den, c_last[..., :K, :V], n_states[:, :, -1, :K],
                          states=(c_states, n_states, c_last) if keep else None)

    def backward(self, q, k, v, gates, c0, n0, h, dh, dc_T, dn_T, norm, states, *, config,
                 interpret):
        # dk (and dq, dv where the Mosaic kernels do not take them) are the Triton backend's
        # kernels at the same chunk size (docs/kernels.md, "Mosaic GPU backend").
        K, V = q.shape[-1], v.shape[-1]
        tcfg = TritonConfig.default(K, V, q.shape[1], q.dtype, chunk_size=config.chunk_size)
        if states is None:
            return TRITON.backward(q, k, v, gates, c0, n0, h, dh, dc_T, dn_T, norm, None,
                                   config=tcfg, interpret=interpret)
        # Kept states are padded to multiples of 64, the Triton kernels' to multiples of 16;
        # the Triton kernels take float32 states next to fp16 operands.
        Kt, Vt = triton_padded_head_dim(K), triton_padded_head_dim(V)
        to_triton = lambda c: c[..., :Kt, :Vt].astype(state_dtype(q.dtype))  # noqa: E731
        c_states, n_states, c_last = states
        triton_states = (to_triton(c_states), n_states[..., :Kt], c_last[..., :Kt, :Vt])
        cfg = config.resolve(K, V)
        if not cfg.mosaic_state_grads:
            return TRITON.backward(q, k, v, gates, c0, n0, h, dh, dc_T, dn_T, norm,
                                   triton_states, config=tcfg, interpret=interpret)
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        qp, kp, vp = pad_last(q, Kp), pad_last(k, Kp), pad_last(v, Vp)
        dhp = pad_last(dh.astype(v.dtype), Vp)
        dc_states, dn_states, dc_first, zc = state_recurrence(
            qp, dhp, gates.w_inter * norm.inv_n,
            gates.w_inter * norm.dden, gates.decay, pad_last(dc_T.astype(jnp.float32), Kp, Vp),
            pad_last(dn_T.astype(jnp.float32), Kp), reverse=True, chunk_size=cfg.chunk_size,
            block_t=cfg.states_block_t, block_k=cfg.states_block_k, block_v=cfg.states_block_v,
            max_steps=cfg.states_stages, warpgroups=cfg.states_warpgroups, carried=c_states,
            interpret=interpret)
        rows = dict(bh=gates.bh, row=gates.row, col=gates.col, start=gates.start,
                    w_inter=gates.w_inter, w_state=gates.w_state, inv_n=norm.inv_n,
                    dden=norm.dden)
        dq = dv = None
        bf16 = jnp.dtype(q.dtype) == STATE_DTYPE
        if cfg.mosaic_dv and bf16:   # fp16: not yet compiled on a GPU against the reference
            dv = chunk_dv(qp, kp, dhp, dc_states, rows, rows, chunk_size=cfg.chunk_size,
                          block_v=cfg.block_v, interpret=interpret)
        # Padded head dims keep Triton's dk (MosaicConfig.mosaic_dk: an XLA compile failure).
        mosaic_dk = cfg.mosaic_dk and bf16 and (Kp, Vp) == (K, V)
        if cfg.mosaic_dq and bf16 and (mosaic_dk or score_block(Vp) == Vp):
            # fp16 inputs keep Triton's dq (the C_c^T slices share a ring with v: one dtype), and
            # so does V > 256 with Triton's dk: this kernel rounds dA in V blocks, Triton's dk
            # all at once, and the forget-gate gradient needs the same rounding in both
            # (q . dq - k . dk cancels; H200, V = 512: d f~ 1.2e-2 against 2.3e-3 relative RMS).
            dq = chunk_dq(qp, kp, vp, dhp, c_states, n_states, rows, rows,
                          chunk_size=cfg.chunk_size, interpret=interpret)
        dk = None
        if mosaic_dk:
            dk = chunk_dk(qp, kp, vp, dhp, dc_states, dn_states, rows, rows,
                          chunk_size=cfg.chunk_size, interpret=interpret)
        cots = (to_triton(dc_states), dn_states[..., :Kt], dc_first[..., :Kt, :Vt])
        return TRITON.intra_grads(q, k, v, dh, gates, norm, triton_states, cots,
                                  jnp.sum(zc, axis=(2, 4)), config=tcfg, interpret=interpret,
                                  dq=dq, dk=dk, dv=dv)


BACKEND = register(MosaicBackend())

__all__ = ["BACKEND", "MosaicBackend", "MosaicConfig"]
