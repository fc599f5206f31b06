"""Test switches. `pytest --gpu` runs the shared backend suite compiled on the GPU (bf16 / fp16 /
fp32, honest tolerances) instead of interpreted on the CPU (float32, tight tolerances)."""

import json
import os

import pytest

# The Mosaic GPU interpreter runs each warpgroup of a kernel as its own blocking XLA CPU
# computation; XLA's CPU client runs as many at once as it has threads (the core count unless
# PJRT_NPROC says otherwise), so a three-warpgroup kernel hangs on a two-core machine.
os.environ.setdefault("PJRT_NPROC", "8")


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="run kernel backends compiled on the GPU (interpret=False)")
    parser.addoption("--mosaic-config", default="", metavar="KEY=VALUE,...",
                     help="tests/test_gpu.py: MosaicConfig fields off their defaults, e.g. "
                          "mosaic_dk=true")
    parser.addoption("--error-report", default=None, metavar="PATH",
                     help="write every checked relative error (test, quantity, error, bound) as JSON")


def pytest_ignore_collect(collection_path, config):
    """tests/test_gpu.py (compiled 16-bit kernels) only runs with --gpu."""
    return collection_path.name == "test_gpu.py" and not config.getoption("--gpu")


def pytest_configure(config):
    from tests import utils
    utils.ON_GPU = config.getoption("--gpu")
    for item in filter(None, config.getoption("--mosaic-config").split(",")):
        key, _, value = item.partition("=")
        flags = {"true": True, "false": False}
        utils.MOSAIC_CONFIG[key] = flags[value.lower()] if value.lower() in flags else int(value)


def pytest_runtest_setup(item):
    from tests import utils
    utils.CURRENT_TEST = item.nodeid


def pytest_sessionfinish(session):
    path = session.config.getoption("--error-report")
    if path:
        from tests import utils
        with open(path, "w") as f:
            json.dump(utils.REPORT, f, indent=0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every compiled executable after each test module: interpret-mode kernels compile
    to large CPU programs, and a whole suite's worth in one process exhausts memory mappings."""
    yield
    import jax
    jax.clear_caches()
