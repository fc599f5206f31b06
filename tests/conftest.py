"""Test switches. `pytest --gpu` runs the shared backend suite compiled on the GPU (bf16 / fp16 /
fp32, honest tolerances) instead of interpreted on the CPU (float32, tight tolerances)."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="run kernel backends compiled on the GPU (interpret=False)")


def pytest_configure(config):
    from tests import utils
    utils.ON_GPU = config.getoption("--gpu")
