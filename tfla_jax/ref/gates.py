"""Gate math shared by every mLSTM implementation (float32 or float64)."""

import jax

import jax.numpy as jnp

# Padding values for positions appended to reach a whole chunk: the forget gate keeps
# (log_sigmoid(F_PAD) == 0 exactly) and the input gate writes nothing (exp(I_PAD - m) == 0),
# so the final state stays exact. Finite on purpose: -inf would give (-inf) - (-inf) = NaN.
F_PAD = 1e4
I_PAD = -1e30


def compute_dtype(*arrays) -> jnp.dtype:
    """float64 when any input is float64, else float32: the dtype of all gate/state math."""
    if any(a is not None and a.dtype == jnp.float64 for a in arrays):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def log_forget_gate(f: jax.Array) -> jax.Array:
    """F = logsig(f~) <= 0."""
    return jax.nn.log_sigmoid(f)


def log_input_gate(i: jax.Array, input_gate: str) -> jax.Array:
    """log i' before stabilisation: i~ (exp) or logsig(i~) (sigmoid)."""
    return i if input_gate == "exp" else jax.nn.log_sigmoid(i)


def denominator_floor(m: jax.Array, input_gate: str) -> jax.Array:
    """Lower bound of |den|: exp(-m) for the stabilised exp gate, 1 for the sigmoid gate."""
    return jnp.exp(-m) if input_gate == "exp" else jnp.ones_like(m)


def normalized_output(num, den, m, input_gate: str, normalize: bool, eps: float):
    """h = num / (max(|den|, floor(m)) + eps); num when normalize is off. num: [..., V], den, m: [...]."""
    if not normalize:
        return num
    return num / (jnp.maximum(jnp.abs(den), denominator_floor(m, input_gate)) + eps)[..., None]
