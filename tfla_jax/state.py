"""The mLSTM recurrent state."""

from typing import NamedTuple

import jax


class MLSTMState(NamedTuple):
    """Stabilised mLSTM state (a pytree); always float32 (float64 for float64 inputs).

    c: (B, H, K, V) matrix memory C_t.
    n: (B, H, K) normaliser n_t.
    m: (B, H) log-scale stabiliser m_t; the unstabilised state is (e^m c, e^m n).
       Always zero for the sigmoid input gate.
    """

    c: jax.Array
    n: jax.Array
    m: jax.Array
