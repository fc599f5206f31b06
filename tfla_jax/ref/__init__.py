"""Reference mLSTM implementations in plain JAX: recurrent (ground truth), parallel, chunkwise."""

from tfla_jax.ref.chunkwise import gate_rows, mlstm_chunkwise, pad_starts, pad_to_chunks
from tfla_jax.ref.parallel import mlstm_parallel
from tfla_jax.ref.recurrent import mlstm_recurrent, mlstm_step_ref, zero_state

__all__ = ["mlstm_recurrent", "mlstm_step_ref", "mlstm_parallel", "mlstm_chunkwise",
           "pad_to_chunks", "pad_starts", "gate_rows", "zero_state"]
