"""Kernel backends behind one contract (base.py) and their registry (docs/backends.md).

Adding a backend: a folder here with its kernels, its config class and a `Backend` subclass that
calls `register(...)`, plus one import line below.
"""

from tfla_jax.backends.base import (Backend, Call, ForwardOut, KernelGrads, NormTerms,
                                    get_backend, kernel_backends, register)
from tfla_jax.backends import triton  # noqa: F401  (registers "pallas_triton")
from tfla_jax.backends import mosaic  # noqa: F401  (registers "pallas_mosaic_gpu")
from tfla_jax.backends.mosaic import MosaicConfig
from tfla_jax.backends.triton import TritonConfig


def available_backends() -> list[str]:
    """Names of the registered kernel backends, fastest first."""
    return [b.name for b in kernel_backends()]


__all__ = ["Backend", "Call", "ForwardOut", "KernelGrads", "NormTerms", "MosaicConfig", "TritonConfig",
           "available_backends", "get_backend", "kernel_backends", "register"]
