"""TFLA Pallas kernels (Triton lowering on GPU; `interpret=True` on CPU)."""

from tfla_jax.pallas.api import mlstm_pallas
from tfla_jax.pallas.bwd import BwdTilingConfig, mlstm_bwd
from tfla_jax.pallas.config import TilingConfig
from tfla_jax.pallas.fwd import mlstm_fwd

__all__ = ["mlstm_pallas", "mlstm_fwd", "mlstm_bwd", "TilingConfig", "BwdTilingConfig"]
