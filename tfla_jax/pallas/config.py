"""Tiling configuration of the TFLA Pallas kernels (lowering independent).

Two forward kernels share one frozen config:
  * chunk-state kernel (`fwd.chunk_states`): grid (K/states_block_k, V/states_block_v, B*H), each
    program runs sequentially over the chunks and over sub-blocks of states_block_kv rows per chunk;
  * output kernel (`fwd.chunk_output`): grid (V/block_v, L/block_q, NC, B*H), each program loops
    over kv tiles of block_kv rows up to the causal diagonal and over K tiles of block_k columns.
Every block is a power of two >= 16 (Triton: pow2 tensors, dots with all dims >= 16); head dims
are padded to a multiple of 16 and blocks are shrunk to divide them (`TilingConfig.resolve`).
"""

import dataclasses

import jax.numpy as jnp

MIN_BLOCK = 16  # Triton dots need every dim >= 16


def _is_pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(d: int) -> int:
    """Head dims are zero-padded to a multiple of MIN_BLOCK (a no-op for 64, 96, 192, 256, ...)."""
    return -(-d // MIN_BLOCK) * MIN_BLOCK


def _fit_block(block: int, dim: int) -> int:
    """The largest power of two <= block that divides dim (dim a multiple of MIN_BLOCK)."""
    b = min(block, _next_pow2(dim))
    while dim % b:
        b //= 2
    return max(b, MIN_BLOCK)


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """Tile sizes and launch parameters of the forward kernels (hashable: a jit static argument).

    chunk_size: L, positions per chunk (power of two >= 16). The chunk states C_k (K x V float32)
      go through HBM once per chunk, so larger L moves fewer bytes and does more intra-chunk FLOPs.
    block_q, block_kv: query / key-value tile inside a chunk in the output kernel (<= L).
    block_k: K tile of the output kernel's dots (q k^T and q C_{k-1}).
    block_v: V tile of the output kernel (a grid axis; q k^T is recomputed once per V tile).
    num_warps, num_stages: Triton launch parameters of the output kernel.
    states_block_k, states_block_v: tile of C in the chunk-state kernel (grid axes).
    states_block_kv: rows of a chunk per dot in the chunk-state kernel (<= L).
    states_num_warps, states_num_stages: Triton launch parameters of the chunk-state kernel.
    keep_states: keep the forward's chunk states for the backward (C_k: NC x K x V float32 per
      (b, h) in HBM) instead of recomputing them there (the default).
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
    states_block_kv: int = 64
    states_num_warps: int = 4
    states_num_stages: int = 3
    keep_states: bool = False

    def __post_init__(self):
        for name in ("chunk_size", "block_q", "block_kv", "block_k", "block_v", "states_block_k",
                     "states_block_v", "states_block_kv"):
            val = getattr(self, name)
            if not _is_pow2(val) or val < MIN_BLOCK:
                raise ValueError(f"TilingConfig.{name}: expected a power of two >= {MIN_BLOCK}, "
                                 f"got {val!r}")
        for name in ("num_warps", "num_stages", "states_num_warps", "states_num_stages"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"TilingConfig.{name}: expected an int >= 1, got {val!r}")
        if not _is_pow2(self.num_warps) or not _is_pow2(self.states_num_warps):
            raise ValueError("TilingConfig.num_warps / states_num_warps: expected a power of two, "
                             f"got {self.num_warps} / {self.states_num_warps}")

    def resolve(self, K: int, V: int) -> "TilingConfig":
        """Blocks shrunk to fit the chunk and to divide the (padded) head dims K and V."""
        L = self.chunk_size
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, L), block_kv=min(self.block_kv, L),
            block_k=_fit_block(self.block_k, Kp), block_v=_fit_block(self.block_v, Vp),
            states_block_k=_fit_block(self.states_block_k, Kp),
            states_block_v=_fit_block(self.states_block_v, Vp),
            states_block_kv=min(self.states_block_kv, L))

    def with_keep_states(self, keep_states: bool = True) -> "TilingConfig":
        return dataclasses.replace(self, keep_states=keep_states)

    def with_chunk_size(self, chunk_size: int) -> "TilingConfig":
        return dataclasses.replace(self, chunk_size=chunk_size)

    @classmethod
    def default(cls, K: int, V: int, T: int, dtype=jnp.bfloat16, input_gate: str = "exp",
                chunk_size: int | None = None) -> "TilingConfig":
        """Defaults per (K, V, T, dtype, input gate), from measurements (benchmarks/NOTES.md).

        chunk_size overrides L (the tiles are then chosen for that L). Without it L = 256, or
        for short sequences the sequence length rounded up to a power of two (at least 16).
        """
        del input_gate  # the same tiling measured best for both gates
        itemsize = jnp.dtype(dtype).itemsize
        if chunk_size is None:
            chunk_size = max(MIN_BLOCK, min(256, _next_pow2(T)))
        L = chunk_size
        # The chunk-state kernel with 3 stages asks for 264 KB of shared memory at L <= 64 on the
        # H100 (232 KB available; 2 stages ran there); 3 stages are fastest at L >= 128.
        states_stages = 3 if L >= 128 else 2
        if jnp.dtype(dtype) == jnp.bfloat16:
            # Measured best on an H100 at B=8 T=8192 H=8 K=256 V=512 bf16, L=256 (NOTES.md);
            # at L=64 (block_q clamped to 64) this ran correctly with 2 states stages.
            cfg = cls(chunk_size=L, block_q=128, block_kv=64, block_k=64, block_v=128,
                      num_warps=8, num_stages=3,
                      states_block_k=64, states_block_v=128, states_block_kv=64,
                      states_num_warps=4, states_num_stages=states_stages)
        elif itemsize == 2:
            # fp16: q C_{k-1} takes float32 operands (C may exceed fp16's range); the bf16 tiling
            # asked for 246 KB of shared memory at K=256 V=512. Quarter-size output tiles, 2
            # stages; not yet measured on the GPU (NOTES.md).
            cfg = cls(chunk_size=L, block_q=64, block_kv=64, block_k=64, block_v=64,
                      num_warps=4, num_stages=2,
                      states_block_k=64, states_block_v=128, states_block_kv=64,
                      states_num_warps=4, states_num_stages=states_stages)
        else:
            # float32 operands (full-precision dots, no tensor cores): small tiles.
            cfg = cls(chunk_size=L, block_q=64, block_kv=64, block_k=64, block_v=64,
                      num_warps=4, num_stages=2,
                      states_block_k=64, states_block_v=64, states_block_kv=64,
                      states_num_warps=4, states_num_stages=2)
        return cfg.resolve(K, V)
