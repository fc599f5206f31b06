"""tfla_jax: Tiled Flash Linear Attention (mLSTM) kernels for JAX."""

from tfla_jax.hf import load_hf_checkpoint
from tfla_jax.ops import mlstm, mlstm_step
from tfla_jax.pallas import TilingConfig
from tfla_jax.state import MLSTMState

__all__ = ["mlstm", "mlstm_step", "MLSTMState", "TilingConfig", "load_hf_checkpoint"]
__version__ = "0.1.0"
