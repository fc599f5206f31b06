"""tfla_jax: Tiled Flash Linear Attention (mLSTM) kernels for JAX.

`import tfla_jax` loads the cell and its kernels only; the Flax model stack (`tfla_jax.layers`,
`tfla_jax.hf`) is imported on first use.
"""

import importlib

from tfla_jax.api import implementations, mlstm, mlstm_step
from tfla_jax.backends import MosaicConfig, TritonConfig, available_backends, get_backend
from tfla_jax.state import MLSTMState

__all__ = ["mlstm", "mlstm_step", "MLSTMState", "MosaicConfig", "TritonConfig", "implementations",
           "available_backends", "get_backend", "load_hf_checkpoint", "layers", "hf"]
__version__ = "0.2.0"

_LAZY = {"layers": "tfla_jax.layers", "hf": "tfla_jax.hf"}


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name == "load_hf_checkpoint":
        return importlib.import_module("tfla_jax.hf").load_hf_checkpoint
    raise AttributeError(f"module 'tfla_jax' has no attribute {name!r}")
