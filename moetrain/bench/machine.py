"""What the figures were measured on: load average, CPU, torch, git commit; and glibc malloc tuning."""

from __future__ import annotations

import os
import platform
import subprocess


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (os.getloadavg)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str) -> str:
    """The commit of the checkout holding `path`, with "+dirty" when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe(device: str) -> dict:
    import torch

    d = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
         "platform": platform.platform()}
    if device == "cuda" and torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
        d["gpu_count"] = torch.cuda.device_count()
    try:
        import deepspeed  # noqa: F401

        d["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - optional
        d["deepspeed"] = None
    return d


def tune_glibc_malloc() -> bool:
    """Keep freed large blocks in glibc's heap (no munmap and page faults on the next allocation): mallopt of
    M_MMAP_THRESHOLD = 1 GiB and M_TRIM_THRESHOLD = 2 GiB - 1. False where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
