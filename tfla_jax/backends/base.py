"""The kernel-backend contract and the registry (docs/backends.md).

A kernel backend computes the chunkwise mLSTM on whole chunks from the gate vectors the policy
(`tfla_jax.api`) builds with `tfla_jax.gates.chunk_gates`; it never sees raw gates, the
stabiliser or the input-gate kind. The policy owns validation, padding, the gate math, the gate
gradients and the one `jax.custom_vjp`; a backend owns its kernels and its config class.

Shapes (per call, T a multiple of the backend's chunk size L, NC = T / L):
    q, k: (B, T, H, K); v, h, dh: (B, T, H, V) in one dtype;
    gates: `tfla_jax.gates.ChunkGates` with (B, H, T) / (B, H, NC) fields, float32;
    c0 (B, H, K, V), n0 (B, H, K) float32: the initial state in the stabiliser of m_states[0].
"""

import abc
import dataclasses
from typing import Any, NamedTuple

import jax


class ForwardOut(NamedTuple):
    """What a backend's forward returns.

    h: (B, T, H, V) in v's dtype; den: (B, H, T) float32, the raw denominator
    w_inter q.n_{c} + sum_s S_{t,s} (before abs / max); c_T (B, H, K, V), n_T (B, H, K) float32;
    states: None, or backend-defined arrays kept for the backward (e.g. the chunk states).
    """

    h: jax.Array
    den: jax.Array
    c_T: jax.Array
    n_T: jax.Array
    states: Any = None


class NormTerms(NamedTuple):
    """Per-row normaliser terms of the backward, (B, H, T) float32.

    inv_n = 1 / (max(|den|, floor) + eps) (1 without normaliser);
    dden = -(dh . h) inv_n sign(den) [|den| > floor] (0 without normaliser).
    """

    inv_n: jax.Array
    dden: jax.Array


class KernelGrads(NamedTuple):
    """What a backend's backward returns (the policy turns it into gate gradients).

    dq, dk: (B, T, H, K), dv: (B, T, H, V) in the input dtypes;
    The forget-gate gradient is assembled from row dots split so that no two large terms cancel
    (docs/math.md; for t in chunk c):
        d F_t = sum_{t<=t' in c} r_t' + sum_{s<t in c} kdk_inter_s + zc_c
    r: (B, H, T) float32, q_t . dq_t - k_t . dk^intra_t (unscaled q, dq complete, dk^intra the
        in-chunk part of dk), both without the diagonal terms dA_tt (q_t . k_t), which cancel;
    kdk_inter: (B, H, T) float32, k_t . (w_state_t (dC_{c+1} v_t + dn_{c+1}));
    kdk: (B, H, T) float32, k_t . dk_t (complete: d log i_t);
    zc: (B, H, NC) float32, decay_c (<C_c, dC_{c+1}> + <n_c, dn_{c+1}>);
    dc0 (B, H, K, V), dn0 (B, H, K) float32: the initial-state cotangents.
    """

    dq: jax.Array
    dk: jax.Array
    dv: jax.Array
    r: jax.Array
    kdk_inter: jax.Array
    kdk: jax.Array
    zc: jax.Array
    dc0: jax.Array
    dn0: jax.Array


@dataclasses.dataclass(frozen=True)
class Call:
    """What `supported` and `default_config` see of one call (all static)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: Any
    input_gate: str
    normalize: bool
    platform: str          # "gpu" or "cpu" (the default backend) or "cuda" when cross-lowering
    device_kind: str       # e.g. "NVIDIA H200"; "" when unknown
    interpret: bool


class Backend(abc.ABC):
    """A kernel backend: forward with residuals, backward, a frozen config class, `supported`.

    Subclasses set `name`, `config_cls`, `speed_rank` (lower = preferred by "pallas" / None) and
    `gpu_only` (compiling for another platform without interpret=True is then a clear error) and
    implement the methods below. Methods are called at trace time with static arguments,
    so a backend traces on any host (cross-lowering for CUDA from a CPU works).
    """

    name: str
    config_cls: type
    speed_rank: int = 100
    gpu_only: bool = True
    # Whether the CPU test suite runs it interpreted in float32 (else only compiled, `--gpu`).
    interpretable: bool = True

    def rank(self, call: Call) -> int:
        """Preference for this call among the backends that run it (lower first): speed_rank
        unless measurements say otherwise for some shapes."""
        return self.speed_rank

    @abc.abstractmethod
    def default_config(self, call: Call, chunk_size: int | None = None):
        """The measured default config for this call (chunk_size overrides L when given)."""

    @abc.abstractmethod
    def chunk_size(self, config) -> int:
        """L of a config: the policy pads T to a multiple of it."""

    @abc.abstractmethod
    def supported(self, call: Call, config) -> str | None:
        """None if the backend runs this call with this config, else the reason it declines."""

    @abc.abstractmethod
    def forward(self, q, k, v, gates, c0, n0, *, config, normalize: bool, eps: float,
                interpret: bool, residuals: bool) -> ForwardOut:
        """h, the raw denominator and the final state on whole chunks (see ForwardOut).

        residuals: True when the call is the forward of a gradient; `ForwardOut.states` may then
        carry what `backward` wants kept (it receives them back as `states`).
        """

    @abc.abstractmethod
    def backward(self, q, k, v, gates, c0, n0, h, dh, dc_T, dn_T, norm: NormTerms, states, *,
                 config, interpret: bool) -> KernelGrads:
        """Gradients with the stabiliser held constant (see KernelGrads)."""


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Adds a backend to the registry (one entry per name)."""
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is registered already")
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The registered kernel backend of that name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"implementation: no kernel backend {name!r}; registered: "
                         f"{sorted(_REGISTRY)}") from None


def kernel_backends() -> list[Backend]:
    """Registered kernel backends, fastest first."""
    return sorted(_REGISTRY.values(), key=lambda b: b.speed_rank)
