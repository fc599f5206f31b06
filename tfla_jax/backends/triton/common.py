"""Helpers shared by the Pallas-Triton kernels and their wrappers."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))   # a @ b.T
TN = (((0,), (0,)), ((), ()))   # a.T @ b
NN = (((1,), (0,)), ((), ()))   # a @ b


def idiv(a, b: int):
    """a // b for a non-negative int tracer and a Python int, in a's dtype (x64-safe)."""
    return lax.div(a, lax.convert_element_type(b, a.dtype))


def irem(a, b: int):
    """a % b for a non-negative int tracer and a Python int, in a's dtype (x64-safe)."""
    return lax.rem(a, lax.convert_element_type(b, a.dtype))


def precision(dtype):
    """float32 inputs: full-precision (IEEE) dots, not TF32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


def state_dtype(dtype):
    """Dtype of chunk states between kernels and of the operands of products with states: bf16
    for bf16 inputs (the tensor-core dots round them to bf16 anyway), else float32 (fp16 would
    overflow on large states)."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(F32)


def params(num_warps, num_stages):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def out_struct(shape, dtype, like):
    """A pallas_call output that varies over the same manual mesh axes as `like` (shard_map with
    check_vma=True needs to know how each output varies)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def pad_last(x, *sizes):
    """Zero-pads the trailing len(sizes) axes to `sizes` (a no-op where they already fit)."""
    lead = x.ndim - len(sizes)
    widths = [(0, 0)] * lead + [(0, s - d) for s, d in zip(sizes, x.shape[lead:])]
    if all(w == (0, 0) for w in widths):
        return x
    return jnp.pad(x, widths)
