import os

import torch

# Triton kernels run in the Triton interpreter on machines without a GPU; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (larger layout matrices, minutes more)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer variant of a tested case; runs with --run-slow only")


def pytest_collection_modifyitems(config, items):
    import pytest

    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
