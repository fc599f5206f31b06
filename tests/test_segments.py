"""Packed sequences (segment_ids): one packed call equals running every sequence on its own.

The reference is a loop over each row's sequences with the lax.scan recurrence (the initial
state for a row's first sequence, zeros after). Compared: h, the final state and every gradient
(q, k, v, i, f and the initial state), for every implementation, both input gates, with and
without an initial state. The rows cover starts inside chunks, at chunk edges, sequences of
length 1, many sequences in one chunk, one sequence over many chunks, and ids that repeat.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfla_jax
from tests import utils
from tests.utils import assert_close, common_stabiliser, make_inputs, random_like, run

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

T, L = 45, 16
# Row b's segment ids: only changes matter (row 2 reuses ids: 7 after 3 is a new sequence).
_IDS = np.stack([
    np.repeat([0, 1, 2], [5, 15, 25]),                                    # starts inside chunks
    np.repeat([4, 5, 6, 7, 8, 9, 10, 11], [16, 16, 1, 1, 1, 3, 2, 5]),    # chunk edges, length 1
    np.repeat([7, 3, 7, 3, 7, 1], [2, 3, 2, 2, 3, 33]),                   # many, then a long one
])
IMPLS = ["recurrent", "parallel", "chunkwise", *utils.suite_backends()]


def _case(gate, with_state):
    q, k, v, i, f, state = make_inputs(11, 3, T, 2, 16, 32, with_state=with_state)
    args = (q, k, v, i, f) + ((state,) if with_state else ())
    return args, random_like(1, v), random_like(2, (jnp.zeros((3, 2, 16, 32)),
                                                  jnp.zeros((3, 2, 16))))


def _value_and_grads(call, gate, with_state):
    """Jitted (h, final state, gradients of sum(h dh) + <c_T, dc> + <n_T, dn>)."""
    args, dh, (dc, dn) = _case(gate, with_state)

    def fwd(*a):
        return call(*a[:5], a[5] if with_state else None)

    def loss(*a):
        h, fin = fwd(*a)
        return jnp.sum(h * dh) + jnp.sum(fin.c * dc) + jnp.sum(fin.n * dn)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
    return (*jax.jit(fwd)(*args), grads)


_REFERENCE = {}


def _reference(gate, with_state):
    if (gate, with_state) not in _REFERENCE:   # one compile per case, shared by every impl
        _REFERENCE[gate, with_state] = _value_and_grads(
            lambda *a: utils.per_sequence(*a, _IDS, input_gate=gate), gate, with_state)
    return _REFERENCE[gate, with_state]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_each_sequence_alone(impl, gate, with_state):
    ids = jnp.asarray(_IDS, jnp.int32)
    kw = dict(chunk_size=L) if impl not in ("recurrent", "parallel") else {}
    q, _, v, *_ = _case(gate, with_state)[0]
    if utils.declines(impl, q, v, input_gate=gate, **kw):
        return

    def packed(q, k, v, i, f, state):
        return run(impl, q, k, v, i, f, initial_state=state, return_state=True,
                   segment_ids=ids, input_gate=gate, **kw)

    h, final, grads = _value_and_grads(packed, gate, with_state)
    h_ref, final_ref, grads_ref = _reference(gate, with_state)
    assert_close(h, h_ref, 1e-4, "h")
    assert_close(*common_stabiliser(final, final_ref), 1e-4, "final state")
    for name, g, w in zip(("q", "k", "v", "i", "f", "state"), grads, grads_ref):
        if name == "state" and gate == "sigmoid":
            g = g._replace(m=w.m)   # m0 is unused by the sigmoid gate
        assert_close(g, w, 1e-4, f"d{name}")


def test_no_segment_ids_and_one_segment_agree():
    q, k, v, i, f, state = make_inputs(3, 2, 20, 1, 8, 8, with_state=True)
    ids = jnp.full((2, 20), 5, jnp.int32)
    a = tfla_jax.mlstm(q, k, v, i, f, initial_state=state, return_state=True,
                       implementation="chunkwise", chunk_size=8)
    b = tfla_jax.mlstm(q, k, v, i, f, initial_state=state, return_state=True,
                       implementation="chunkwise", chunk_size=8, segment_ids=ids)
    assert_close(b, a, 1e-6, "one segment")


@pytest.mark.parametrize("bad", [np.zeros((2, 19), np.int32), np.zeros((2, 20), np.float32),
                                 np.zeros((2, 20, 1), np.int32), [[0] * 20] * 2])
def test_bad_segment_ids_name_the_argument(bad):
    q, k, v, i, f, _ = make_inputs(3, 2, 20, 1, 8, 8)
    with pytest.raises(ValueError, match="segment_ids"):
        tfla_jax.mlstm(q, k, v, i, f, segment_ids=bad)
