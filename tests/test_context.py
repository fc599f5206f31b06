"""Context parallelism (`tfla_jax.mlstm(..., context_axis=...)`, docs/context_parallel.md).

The sharded-equals-unsharded cases need a multi-device CPU (XLA_FLAGS before jax is imported),
so they run in one subprocess (`tests/context_cases.py`) that reports each case as JSON; the
argument checks run here.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import tfla_jax
from tests import context_cases
from tests.utils import make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "tests.context_cases"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in rows}


@pytest.mark.parametrize("case", list(context_cases.CASES))
def test_sharded_equals_unsharded(results, case):
    """h (2e-5), final state and every gradient (1e-4, relative RMS) of the sharded call."""
    r = results[case]
    assert r["finite"], r
    for name, err in r["errors"].items():
        tol = context_cases.TOL_H if name == "h" else context_cases.TOL_GRAD
        assert err <= tol, f"{case}: {name} relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("axis", [None, "ctx"])
def test_context_axis_outside_shard_map_names_the_argument(axis):
    q, k, v, i, f, _ = make_inputs(0, 1, 8, 1, 4, 4)
    if axis is None:
        tfla_jax.mlstm(q, k, v, i, f, context_axis=None)
        return
    with pytest.raises(ValueError, match="context_axis"):
        tfla_jax.mlstm(q, k, v, i, f, context_axis=axis)


@pytest.mark.parametrize("axis", ["other", 0, ("ctx",)])
def test_unknown_context_axis_names_the_argument(axis):
    q, k, v, i, f, _ = make_inputs(0, 1, 8, 1, 4, 4)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("ctx",))
    seq = P(None, "ctx")
    op = jax.shard_map(lambda *a: tfla_jax.mlstm(*a, context_axis=axis)[0], mesh=mesh,
                       in_specs=(seq,) * 5, out_specs=seq)
    with pytest.raises(ValueError, match="context_axis"):
        op(q, k, v, i, f)
