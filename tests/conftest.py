import os

import pytest
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
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # The Triton cases outside tests/test_cuda.py feed CPU tensors to the kernels, which only the interpreter
        # (chosen above on machines without a GPU) accepts; on a GPU machine tests/test_cuda.py runs the compiled
        # kernels on CUDA tensors against the same references.
        cpu_triton = pytest.mark.skip(reason="Triton on CPU tensors needs the interpreter; tests/test_cuda.py covers "
                                             "the compiled kernels on this GPU machine")
        for item in items:
            if "triton" in item.nodeid.lower() and not item.nodeid.startswith("tests/test_cuda.py"):
                item.add_marker(cpu_triton)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


FAKE_WANDB_API_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def wandb_offline_run(tmp_path_factory):
    """One short training logged to wandb offline, shared by the tests that read it back (tests/test_wandb_training.py,
    tests/test_dashboard.py): 6 steps of the small test model in capacity mode (so dropped_frac is logged too), a
    router aux loss, a load heatmap every 2 steps, and a fake WANDB_API_KEY in the environment. Returns
    (run_dir, fake_key)."""
    pytest.importorskip("wandb")
    from moetrain.cli import train_main
    from tests.train_utils import overrides

    base = tmp_path_factory.mktemp("wandb_offline")
    run = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", FAKE_WANDB_API_KEY)
        mp.setenv("WANDB_SILENT", "true")
        args = overrides(run, base / "cache", "trainer.max_steps=6", "logger.wandb=true", "logger.wandb_mode=offline",
                         "logger.heatmap_every=2", "router.aux_loss_coeff=0.01", "router.capacity_factor=1.0")
        assert train_main(args) == 0
    return run, FAKE_WANDB_API_KEY
