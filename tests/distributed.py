"""The multi-process test harness: moetrain.utils.local_ranks, re-exported for the tests."""

from moetrain.utils.local_ranks import free_port, run_distributed  # noqa: F401
