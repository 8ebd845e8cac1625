"""Run a command in a fresh network namespace whose loopback is rate-limited with `tc ... tbf` (root only).

On plain loopback the all-to-all is a memcpy competing with the experts for the same cores; with the loopback
limited to e.g. 2gbit or 500mbit the wire, not the CPU, bounds communication: the situation pipelining is for. The
token bucket's burst (256 KB) is above the 64 KiB loopback MTU. The namespace is deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def unavailable_reason() -> str | None:
    """None when a rate-limited namespace can be made here, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    return f"needs {' and '.join(missing)} (iproute2)" if missing else None


def run_in_rate_limited_netns(rate: str, cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` (environment `env`, default this one's) inside a namespace whose loopback is limited to `rate`
    (a tc rate: 2gbit, 500mbit)."""
    why = unavailable_reason()
    if why:
        raise RuntimeError(f"a rate-limited network namespace {why}; run on plain loopback instead")
    ns = f"moetrain-bench-{os.getpid()}"
    setup = [["ip", "netns", "add", ns], ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
             ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
              "burst", "256kb", "latency", "50ms"]]
    try:
        for c in setup:
            subprocess.run(c, check=True, capture_output=True, text=True)
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], env=env)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
