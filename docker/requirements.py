"""Print moetrain's requirements, with the given extras, except torch: one per line, for `pip install -r`.

The container installs moetrain itself with --no-deps and its other requirements from this list, so that pip never
touches the image's torch. NVIDIA's PyTorch images ship a pre-release build (`2.8.0a0+...`), which `torch>=2.8` does
not accept (PEP 440 orders 2.8.0a0 before 2.8), and pin it in the pip constraints file /etc/pip/constraint.txt.

    python docker/requirements.py wandb kernels      # needs moetrain's metadata: pip install --no-deps -e . first
"""

import sys
from importlib.metadata import metadata, requires

from packaging.requirements import Requirement

SKIP = {"torch"}  # provided by the base image


def requirements(extras: list[str]) -> list[str]:
    """moetrain's requirements without torch, plus those of `extras` (names of setup.py's extras_require)."""
    known = set(metadata("moetrain").get_all("Provides-Extra") or [])
    unknown = sorted(set(extras) - known)
    if unknown:
        raise SystemExit(f"requirements.py: error: unknown extra {', '.join(unknown)}; moetrain has "
                         f"{', '.join(sorted(known))}")
    out: dict[str, None] = {}  # ordered, without repeats (several extras may name the same package)
    for line in requires("moetrain") or []:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in extras):
            req.marker = None
            out[str(req)] = None
    return list(out)


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
