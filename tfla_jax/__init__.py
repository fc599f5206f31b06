"""tfla_jax: Tiled Flash Linear Attention (mLSTM) kernels for JAX."""

from tfla_jax.ops import mlstm, mlstm_step
from tfla_jax.state import MLSTMState

__all__ = ["mlstm", "mlstm_step", "MLSTMState"]
__version__ = "0.1.0"
