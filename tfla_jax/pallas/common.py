"""Small helpers shared by the forward and backward kernel wrappers."""

import jax
import jax.numpy as jnp


def out_struct(shape, dtype, like):
    """A pallas_call output shape that varies over the same manual mesh axes as `like`.

    Inside `jax.shard_map` (check_vma=True) Pallas needs to know how each output varies across
    the mesh; the kernels' outputs vary as their inputs do (see `match_vma`).
    """
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def match_vma(*arrays):
    """Makes every array vary over the union of the arrays' manual mesh axes (no-op outside
    shard_map), so that one input's type describes every kernel output."""
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in arrays))
    out = []
    for x in arrays:
        missing = tuple(sorted(axes - jax.typeof(x).manual_axis_type.varying))
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return out


def pad_last(x, *sizes):
    """Zero-pads the trailing len(sizes) axes to `sizes` (a no-op where they already fit)."""
    lead = x.ndim - len(sizes)
    widths = [(0, 0)] * lead + [(0, s - d) for s, d in zip(sizes, x.shape[lead:])]
    if all(w == (0, 0) for w in widths):
        return x
    return jnp.pad(x, widths)


def initial_state_f32(c0, n0, m0, B, H, K, V, exp_gate):
    """(c0, n0, m0) in float32, zeros where None; m0 is zero for the sigmoid gate (no stabiliser)."""
    c0 = jnp.zeros((B, H, K, V), jnp.float32) if c0 is None else c0.astype(jnp.float32)
    n0 = jnp.zeros((B, H, K), jnp.float32) if n0 is None else n0.astype(jnp.float32)
    m0 = (jnp.zeros((B, H), jnp.float32) if m0 is None or not exp_gate
          else m0.astype(jnp.float32))
    return c0, n0, m0
