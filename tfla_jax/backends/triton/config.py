"""`TritonConfig`: every tile and launch parameter of the Pallas-Triton kernels, forward and backward.

Kernels (docs/kernels.md) and the fields that tile them:
  chunk_states, state_grads  grid (K/states_block_k, V/states_block_v, B, H), sequential over the
                             chunks in sub-blocks of states_block_t rows: states_*
  output (forward)           grid (V/block_v, L/block_q, NC, B*H), kv tiles of block_kv rows up to
                             the diagonal, K tiles of block_k: block_*, num_warps, num_stages
  dq, dk (backward)          grid (T/bwd_block_q or T/bwd_block_kv, K/bwd_block_k_out, B, H),
                             V tiles of bwd_block_v: bwd_*
  dv (backward)              grid (T/dv_block_kv, V/dv_block_v_out, B, H), K tiles of dv_block_k: dv_*
Every block is a power of two >= 16 (Triton: power-of-two tensors, dots with all dims >= 16).
Head dims are zero-padded to a multiple of 16 and blocks shrink to fit (`TritonConfig.resolve`).
"""

import dataclasses

import jax.numpy as jnp

MIN_BLOCK = 16  # Triton dots need every dim >= 16
_BLOCKS = ("chunk_size", "block_q", "block_kv", "block_k", "block_v", "states_block_k",
           "states_block_v", "states_block_t", "bwd_block_q", "bwd_block_kv", "bwd_block_v",
           "dv_block_k")
_OPTIONAL_BLOCKS = ("bwd_block_k_out", "dv_block_v_out", "dv_block_q", "dv_block_kv")
_LAUNCH = ("num_warps", "num_stages", "states_num_warps", "states_num_stages", "bwd_num_warps",
           "bwd_num_stages", "dv_num_warps", "dv_num_stages")


def _is_pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(d: int) -> int:
    """Head dims are zero-padded to a multiple of MIN_BLOCK (a no-op for 64, 96, 192, 256, ...)."""
    return -(-d // MIN_BLOCK) * MIN_BLOCK


def fit_block(block: int, dim: int) -> int:
    """The largest power of two <= block that divides dim (dim a multiple of MIN_BLOCK)."""
    b = 1 << (min(block, dim).bit_length() - 1)
    while dim % b:
        b //= 2
    return max(b, MIN_BLOCK)


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiles and launch parameters of the Pallas-Triton backend (frozen: a jit static argument).

    chunk_size: L, positions per chunk (power of two >= 16). Chunk states (K x V) go through HBM
      once per chunk: larger L moves fewer bytes and does more intra-chunk FLOPs.
    Forward output kernel: block_q, block_kv (query / key tiles, <= L), block_k (K tile of its
      dots), block_v (V tile, a grid axis: q k^T is recomputed per V tile), num_warps, num_stages.
    Chunk-state kernels (forward, backward recompute, and the reverse dC recurrence):
      states_block_k, states_block_v (the C tile of one program), states_block_t (rows per dot),
      states_num_warps, states_num_stages.
    dq / dk kernels: bwd_block_q, bwd_block_kv, bwd_block_v (V tile of their inner loops),
      bwd_block_k_out (K tile of the outputs; None = all of K), bwd_num_warps, bwd_num_stages.
    dv kernel: dv_block_k (K tile of its loops), dv_block_v_out (None = all of V), dv_block_q,
      dv_block_kv (None = the bwd_ tiles), dv_num_warps, dv_num_stages.
    keep_states: keep the forward's chunk states for the backward instead of recomputing them.
    """

    chunk_size: int = 256
    block_q: int = 128
    block_kv: int = 64
    block_k: int = 64
    block_v: int = 128
    num_warps: int = 8
    num_stages: int = 3
    states_block_k: int = 64
    states_block_v: int = 128
    states_block_t: int = 64
    states_num_warps: int = 4
    states_num_stages: int = 3
    bwd_block_q: int = 64
    bwd_block_kv: int = 64
    bwd_block_v: int = 64
    bwd_block_k_out: int | None = None
    bwd_num_warps: int = 8
    bwd_num_stages: int = 4
    dv_block_k: int = 256
    dv_block_v_out: int | None = 256
    dv_block_q: int | None = None
    dv_block_kv: int | None = None
    dv_num_warps: int = 8
    dv_num_stages: int = 2
    keep_states: bool = False

    def __post_init__(self):
        for name in _BLOCKS + _OPTIONAL_BLOCKS:
            val = getattr(self, name)
            if val is None and name in _OPTIONAL_BLOCKS:
                continue
            if not _is_pow2(val) or val < MIN_BLOCK:
                raise ValueError(f"TritonConfig.{name}: expected a power of two >= {MIN_BLOCK}"
                                 f"{' or None' if name in _OPTIONAL_BLOCKS else ''}, got {val!r}")
        for name in _LAUNCH:
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"TritonConfig.{name}: expected an int >= 1, got {val!r}")
            if name.endswith("num_warps") and not _is_pow2(val):
                raise ValueError(f"TritonConfig.{name}: expected a power of two, got {val!r}")
        if not isinstance(self.keep_states, bool):
            raise ValueError(f"TritonConfig.keep_states: expected a bool, got {self.keep_states!r}")

    def resolve(self, K: int, V: int) -> "TritonConfig":
        """Blocks shrunk to fit the chunk and to divide the (padded) head dims K and V."""
        L = self.chunk_size
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        bwd_q, bwd_kv = min(self.bwd_block_q, L), min(self.bwd_block_kv, L)
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, L), block_kv=min(self.block_kv, L),
            block_k=fit_block(self.block_k, Kp), block_v=fit_block(self.block_v, Vp),
            states_block_k=fit_block(self.states_block_k, Kp),
            states_block_v=fit_block(self.states_block_v, Vp),
            states_block_t=min(self.states_block_t, L),
            bwd_block_q=bwd_q, bwd_block_kv=bwd_kv,
            bwd_block_v=fit_block(self.bwd_block_v, Vp),
            bwd_block_k_out=fit_block(self.bwd_block_k_out or Kp, Kp),
            dv_block_k=fit_block(self.dv_block_k, Kp),
            dv_block_v_out=fit_block(self.dv_block_v_out or Vp, Vp),
            dv_block_q=min(self.dv_block_q or bwd_q, L),
            dv_block_kv=min(self.dv_block_kv or bwd_kv, L))

    @classmethod
    def default(cls, K: int, V: int, T: int, dtype=jnp.bfloat16, input_gate: str = "exp",
                chunk_size: int | None = None, device_kind: str = "") -> "TritonConfig":
        """Measured defaults per (head dims, dtype) (benchmarks/README.md).

        Tuned on an H100 at B=8 T=8192 H=8 K=256 V=512 bf16, L=256, and re-measured on an H200
        (the same tiling is the fastest there; other device kinds get it too). chunk_size
        overrides L; without it L = 256, or for short sequences T rounded up to a power of two.
        """
        del input_gate, device_kind  # one tiling measured best for both gates, on H100 and H200
        if chunk_size is None:
            chunk_size = max(MIN_BLOCK, min(256, _next_pow2(T)))
        L = chunk_size
        dtype = jnp.dtype(dtype)
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        small = max(Kp, Vp) <= 64
        warps = 4 if small else 8
        # 3 pipeline stages of the chunk-state kernels need too much shared memory at L <= 64.
        states_stages = 3 if L >= 128 else 2
        if dtype == jnp.bfloat16:
            cfg = cls(chunk_size=L, states_num_stages=states_stages, bwd_num_warps=warps,
                      dv_num_warps=warps, bwd_num_stages=4 if Kp <= 256 else 2)
        elif dtype.itemsize == 2:
            # fp16: products with states take float32 operands (C may exceed fp16's range), so
            # the tiles are smaller to fit shared memory.
            cfg = cls(chunk_size=L, block_q=64, block_v=64, num_warps=4, num_stages=2,
                      states_num_stages=2, bwd_block_k_out=128, bwd_num_warps=warps,
                      bwd_num_stages=2, dv_block_k=64, dv_block_v_out=128, dv_num_warps=warps)
        else:
            # float32 operands (full-precision dots, no tensor cores): small tiles, few stages.
            cfg = cls(chunk_size=L, block_q=64, block_v=64, num_warps=4, num_stages=2,
                      states_block_v=64, states_block_t=32, states_num_stages=2,
                      bwd_block_k_out=64, bwd_num_stages=2, dv_block_k=64, dv_block_v_out=64,
                      dv_num_warps=4)
        return cfg.resolve(K, V)
