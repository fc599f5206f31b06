"""`MosaicConfig`: every tile of the Mosaic GPU kernels (docs/kernels.md).

Kernels and the fields that tile them:
  chunk states (forward) and state grads   grid (K/(wk states_block_k), V/(wv states_block_v),
      B*H), wk x wv = states_warpgroups compute warpgroups and a memory warpgroup per CTA,
      sequential over the chunks in TMA sub-blocks of states_block_t rows: states_*
  output (forward)   grid (V/block_v, L/128, NC, B*H), 2 compute warpgroups x 64 query rows and
      a TMA warpgroup, 64-row kv tiles up to the diagonal: block_v
wgmma constraints: row tiles (M) are multiples of 64, column tiles (N) multiples of 8 and <= 256;
head dims are zero-padded to a multiple of 64. Shared memory (~227 KB per CTA) bounds the
output kernel to K <= 256 with block_v <= 256 (larger K goes to another backend).
"""

import dataclasses

import jax.numpy as jnp

WGMMA_M = 64      # wgmma row tiles are multiples of this; head dims are padded to it
MAX_N = 256       # wgmma column tiles are at most this
TMA_BOX = 256     # a TMA copy moves at most this many elements per dimension
MIN_CHUNK = 128  # the output kernel's CTA covers 2 x 64 query rows of one chunk
MAX_CHUNK = TMA_BOX  # a chunk's gate vectors arrive in one TMA copy
MAX_K = 256       # the output kernel keeps q of 2 x 64 rows and 2 k tiles (64 x K) in SMEM

# Two warpgroups per state-kernel CTA halve its grid; below this many CTAs (about one per SM
# of an H100 / H200) one warpgroup per CTA was faster (H200: T = 32K, B*H = 16).
FILL_CTAS = 128

_BLOCKS = ("chunk_size", "block_v", "states_block_t", "states_block_k", "states_block_v")


def padded_head_dim(d: int) -> int:
    return -(-d // WGMMA_M) * WGMMA_M


def _fit(block: int, dim: int) -> int:
    """The largest multiple of 64 <= block dividing dim (dim a multiple of 64)."""
    b = max(WGMMA_M, min(block, dim) // WGMMA_M * WGMMA_M)
    while dim % b:
        b -= WGMMA_M
    return b


def warpgroup_split(K: int, V: int, block_k: int, block_v: int, warpgroups: int):
    """(wk, wv): compute warpgroups of one state-kernel CTA along K and V (wk * wv <=
    warpgroups); K first, because the warpgroups along K share the wider b = v rows."""
    if warpgroups >= 2 and K % (2 * block_k) == 0:
        return 2, 1
    if warpgroups >= 2 and V % (2 * block_v) == 0:
        return 1, 2
    return 1, 1


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of the Mosaic GPU backend (frozen: a jit static argument). Every block is a
    multiple of 64; block_v and states_block_v are at most 256.

    chunk_size: L (a power of two; the backend runs L = 128 and 256).
    block_v: the V slice of the output kernel (a grid axis; q k^T is recomputed per slice).
    states_block_k, states_block_v: the state tile one CTA of the recurrences owns;
      states_block_t: rows per TMA sub-block; states_stages: TMA buffers in flight;
      states_warpgroups: compute warpgroups per CTA (1 or 2; two own adjacent tiles along K,
      or along V when K is one tile, and share the rows loaded for them).
    keep_states: keep the forward's chunk states (bf16) for the backward instead of recomputing
      them there (measured on an H200 at the headline shape: forward+backward 9.0 vs 9.9 ms, the
      same compiled peak memory, 3.92 GB: the recompute's states are live at the same time).
    mosaic_state_grads: with kept states, run the backward's reverse state recurrence (dC, dn
      and the forget gate's carried terms) on the Mosaic state kernel instead of Triton's
      (H200, headline shape: forward+backward 8.05 vs 8.22 ms, exp gate).
    mosaic_dv: with mosaic_state_grads and bf16 inputs, dv on the output kernel transposed
      (`fwd.chunk_dv`) instead of Triton's dv kernel (H200, headline shape, exp: dv 0.96 vs
      1.65 ms, forward+backward 7.26 vs 7.95 ms).
    mosaic_dq: with mosaic_state_grads, bf16 inputs and V <= 256, dq on the Mosaic kernel
      (`bwd.chunk_dq`) instead of Triton's (H200, K = 256, V = 512 in V blocks: dq 1.25 vs
      1.41 ms, but d f~ off, see `MosaicBackend.backward`); with mosaic_dk at every V.
    mosaic_dk: with mosaic_state_grads, bf16 inputs and K, V multiples of 64, dk on the Mosaic
      kernel (`bwd.chunk_dk`, dq's kernel transposed, rounding dA alike; H200, headline shape:
      forward+backward 7.07 vs 7.29 ms, exp). Padded head dims keep Triton's dk: at K 96, V 192
      XLA failed to compile a transpose fusion of that backward ("loop_transpose_fusion: cannot be
      converted to LLVM IR", jax 0.11.2, H200).
    """

    chunk_size: int = 256
    block_v: int = 256
    states_block_t: int = 64
    states_block_k: int = 64
    states_block_v: int = 256
    states_stages: int = 2
    states_warpgroups: int = 2
    keep_states: bool = True
    mosaic_state_grads: bool = True
    mosaic_dv: bool = True
    mosaic_dq: bool = True
    mosaic_dk: bool = True

    def __post_init__(self):
        L = self.chunk_size
        if not isinstance(L, int) or isinstance(L, bool) or L < 1 or L & (L - 1):
            raise ValueError(f"MosaicConfig.chunk_size: expected a power of two, got {L!r}")
        for name in _BLOCKS[1:]:
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < WGMMA_M or val % WGMMA_M:
                raise ValueError(f"MosaicConfig.{name}: expected a multiple of {WGMMA_M}, "
                                 f"got {val!r}")
        if not isinstance(self.states_stages, int) or self.states_stages < 1:
            raise ValueError(f"MosaicConfig.states_stages: expected an int >= 1, got "
                             f"{self.states_stages!r}")
        if self.states_warpgroups not in (1, 2) or isinstance(self.states_warpgroups, bool):
            raise ValueError(f"MosaicConfig.states_warpgroups: expected 1 or 2, got "
                             f"{self.states_warpgroups!r}")
        for name in ("keep_states", "mosaic_state_grads", "mosaic_dv", "mosaic_dq",
                     "mosaic_dk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MosaicConfig.{name}: expected a bool, got "
                                 f"{getattr(self, name)!r}")
        for name in ("block_v", "states_block_v"):
            if getattr(self, name) > MAX_N:
                raise ValueError(f"MosaicConfig.{name}: wgmma tiles are at most {MAX_N} wide, "
                                 f"got {getattr(self, name)}")

    def resolve(self, K: int, V: int) -> "MosaicConfig":
        """Blocks shrunk to fit the chunk and to divide the padded head dims."""
        L = self.chunk_size
        Kp, Vp = padded_head_dim(K), padded_head_dim(V)
        return dataclasses.replace(
            self, block_v=_fit(self.block_v, Vp),
            states_block_t=max(WGMMA_M, min(self.states_block_t, L)),
            states_block_k=_fit(self.states_block_k, Kp),
            states_block_v=_fit(self.states_block_v, Vp))

    @classmethod
    def default(cls, K: int, V: int, T: int, dtype=None, input_gate: str = "exp",
                chunk_size: int | None = None, device_kind: str = "",
                heads: int | None = None) -> "MosaicConfig":
        """Measured defaults (benchmarks/README.md); chunk_size overrides L; heads: B * H."""
        del input_gate, device_kind
        if chunk_size is None:
            chunk_size = max(MIN_CHUNK, min(256, 1 << max(0, (T - 1).bit_length())))
        # fp16 inputs need separate bf16 slots for the C_c slices: a narrower V slice fits.
        block_v = 128 if dtype is not None and jnp.dtype(dtype) == jnp.float16 else 256
        cfg = cls(chunk_size=chunk_size, block_v=block_v).resolve(K, V)
        wk, wv = warpgroup_split(padded_head_dim(K), padded_head_dim(V), cfg.states_block_k,
                                 cfg.states_block_v, 2)
        ctas = (padded_head_dim(K) // (wk * cfg.states_block_k)
                * (padded_head_dim(V) // (wv * cfg.states_block_v)) * (heads or FILL_CTAS))
        return dataclasses.replace(cfg, states_warpgroups=2 if ctas >= FILL_CTAS else 1)
