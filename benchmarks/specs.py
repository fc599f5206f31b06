"""The one registry of benchmark shapes (no JAX / torch imports: every process may read it)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    """An mLSTM problem: q, k (B, T, H, K), v (B, T, H, V) in dtype."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str = "bfloat16"

    @property
    def tokens(self) -> int:
        return self.B * self.T

    def attention(self) -> tuple:
        """(B, T, H, D) of the causal-attention peer at the same tokens."""
        return (self.B, self.T, *ATTENTION_HEADS.get(self, ATTENTION_HEADS["default"]))


TOKENS = 65_536  # B * T of the sweeps
HEADLINE = Shape(B=8, T=8192, H=8, K=256, V=512)  # the xLSTM 7B head shape
T_SWEEP = [Shape(B=TOKENS // T, T=T, H=8, K=256, V=512) for T in (1024 * 2 ** j for j in range(7))]
# Issue 10's bar: T = 2K, 8K and 32K at constant tokens.
BAR = [s for s in T_SWEEP if s.T in (2048, 8192, 32768)]
LONG = [s for s in T_SWEEP if s.T >= 32768]   # B * H <= 16: the state kernels' grid is small
HEAD_SWEEP = [dataclasses.replace(HEADLINE, K=K, V=V) for K, V in ((128, 128), (256, 256), (256, 512))]
SMOKE = Shape(B=1, T=64, H=2, K=32, V=32, dtype="float32")  # CPU, interpret=True
# --check: bf16 kernels vs the float32 chunkwise reference on the same inputs (smoke: itself).
CHECK = Shape(B=2, T=4096, H=8, K=256, V=512)

# Causal attention heads (H, D) at the same tokens: the 7B's attention-model counterpart.
ATTENTION_HEADS = {"default": (32, 128), SMOKE: (2, 32)}

SETS = {"headline": [HEADLINE], "t_sweep": T_SWEEP, "head_sweep": HEAD_SWEEP, "smoke": [SMOKE],
        "check": [CHECK], "bar": BAR, "long": LONG}


def shapes(names: str) -> list:
    """"headline,t_sweep" -> the shapes of those sets, in order, without duplicates."""
    out = []
    for name in filter(None, names.split(",")):
        if name not in SETS:
            raise SystemExit(f"unknown shape set {name!r}; known: {', '.join(SETS)}")
        out += [s for s in SETS[name] if s not in out]
    return out


def check_shape(shape: Shape) -> Shape:
    """The smaller shape the --check mode compares at: CHECK on the GPU, the smoke shape itself."""
    return shape if shape == SMOKE else dataclasses.replace(CHECK, K=shape.K, V=shape.V,
                                                            dtype=shape.dtype)
