"""Damaged, interrupted and refused checkpoints: checksums, verification, fallback, one-line errors, disk full,
non-finite weights, trainer state and pruning after a fallback (moetrain.train.checkpoint)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from torch import nn

from moetrain.train import checkpoint as ckpt
from moetrain.train.checkpoint import (CheckpointError, find_latest, find_latest_valid, load_checkpoint,
                                       read_trainer_state, save_checkpoint, verify_checkpoint)
from tests.distributed import run_distributed


class Tiny(nn.Module):
    """A dense Linear and one stacked expert parameter holding the experts `expert_ids`."""

    def __init__(self, expert_ids=(0, 1), width: int = 4):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.experts = nn.Parameter(torch.randn(len(expert_ids), width, width))
        self.experts.expert_ids = list(expert_ids)


def stamp(model: Tiny, value: float) -> None:
    """Make the checkpointed weights identify the step they were saved at."""
    with torch.no_grad():
        model.dense.bias.fill_(value)
        model.experts.fill_(value)


def save_steps(root: Path, steps=(1, 2, 3), model: Tiny | None = None, **kwargs) -> tuple[list[Path], Tiny]:
    model = model or Tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    paths = []
    for step in steps:
        stamp(model, float(step))
        paths.append(save_checkpoint(root, step, model, optimizer, keep=len(steps), **kwargs))
    return paths, model


def loaded_step(path: Path, expert_ids=(0, 1), **kwargs) -> float:
    """The step stamped into the weights of the checkpoint `path` (checks dense and expert entries agree)."""
    model = Tiny(expert_ids)
    load_checkpoint(path, model, **kwargs)
    assert torch.all(model.experts == model.dense.bias[0])
    return model.dense.bias[0].item()


def flip_byte(file: Path, where: float = 0.5) -> None:
    data = bytearray(file.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    file.write_bytes(bytes(data))


def only_complete(path: Path) -> None:
    for entry in path.iterdir():
        if entry.name != "COMPLETE":
            entry.unlink()


def zero_end_of_first_entry(file: Path) -> None:
    """Zero the last 30 bytes of the first tensor stored in a shard (its zip directory), keeping the size."""
    infos = ckpt.read_metadata_safely(file.parent).storage_data.values()
    first = min((i for i in infos if i.relative_path == file.name), key=lambda i: i.offset)
    data = bytearray(file.read_bytes())
    end = first.offset + first.length
    data[end - 30:end] = bytes(30)
    file.write_bytes(bytes(data))


def same_size_garbage(file: Path) -> None:
    file.write_bytes(b"#" * file.stat().st_size)


# Each damage: what it does to the newest checkpoint, and what verify_checkpoint must say about it.
DAMAGE = {
    "truncated shard": (lambda p: (p / "__0_0.distcp").write_bytes((p / "__0_0.distcp").read_bytes()[:12]),
                        r"__0_0\.distcp is truncated \(12 of \d+ bytes\)"),
    "missing shard": (lambda p: (p / "__0_0.distcp").unlink(), r"__0_0\.distcp is missing"),
    "flipped byte in shard": (lambda p: flip_byte(p / "__0_0.distcp"), r"checksum mismatch in __0_0\.distcp"),
    "only COMPLETE": (only_complete, r"it has no \.metadata file"),
    "missing .metadata": (lambda p: (p / ".metadata").unlink(), r"\.metadata is missing"),
    "corrupt .metadata": (lambda p: flip_byte(p / ".metadata", 0.9), r"checksum mismatch in \.metadata"),
    "corrupt moetrain.json": (lambda p: same_size_garbage(p / "moetrain.json"), r"checksum mismatch in moetrain\.json"),
    "missing manifest": (lambda p: (p / "checksums.json").unlink(), r"no checksums manifest"),
    "corrupt manifest": (lambda p: (p / "checksums.json").write_text("{"), r"checksums\.json is unreadable"),
}


# ----------------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------------


def test_manifest_lists_every_file_with_size_and_crc32(tmp_path):
    (path,), _ = save_steps(tmp_path, steps=(1,))
    manifest = json.loads((path / "checksums.json").read_text())
    assert manifest["algorithm"] == "crc32"
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"COMPLETE", "checksums.json"}
    for name, entry in manifest["files"].items():
        assert (entry["size"], entry["crc32"]) == ckpt.file_checksum(path / name), name
    assert verify_checkpoint(path) is None


def test_file_checksum_reads_in_chunks(tmp_path, monkeypatch):
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(ckpt, "CHUNK_BYTES", 1024)  # five full chunks and a partial one
    assert ckpt.file_checksum(tmp_path / "f") == (5000, zlib.crc32(data))


# ----------------------------------------------------------------------------------------------------------------
# Damage: detected, refused in one line, skipped by find_latest_valid
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_named_refused_and_skipped(tmp_path, capsys, kind):
    damage, expected = DAMAGE[kind]
    (_, older, newest), _ = save_steps(tmp_path)
    damage(newest)

    reason = verify_checkpoint(newest)
    assert reason is not None and reason.startswith(f"{newest}: ")
    assert re.search(expected, reason), reason

    fresh = Tiny()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(newest, fresh, torch.optim.AdamW(fresh.parameters()))
    message = str(error.value)
    assert "\n" not in message and str(newest) in message and re.search(expected, message), message
    assert "KeyError" not in message

    capsys.readouterr()
    assert find_latest_valid(tmp_path) == older
    skipped = capsys.readouterr().err
    assert skipped == f"moetrain: {reason.replace(str(newest), f'skipping checkpoint {newest}', 1)}; " \
                      "falling back to an older one\n"
    assert loaded_step(older) == 2.0
    assert verify_checkpoint(older) is None


def test_every_damaged_checkpoint_is_skipped_until_an_intact_one(tmp_path, capsys):
    (oldest, middle, newest), _ = save_steps(tmp_path)
    flip_byte(newest / "__0_0.distcp")
    (middle / "__0_0.distcp").unlink()
    assert find_latest_valid(tmp_path) == oldest
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"moetrain: skipping checkpoint {newest}: checksum mismatch in __0_0.distcp; falling back to an "
                     "older one",
                     f"moetrain: skipping checkpoint {middle}: __0_0.distcp is missing; falling back to an older one"]
    (oldest / "moetrain.json").unlink()
    with pytest.raises(CheckpointError, match=f"no intact checkpoint in {tmp_path}: all 3 complete checkpoints are "
                                              f"damaged \\(newest: {newest}: checksum mismatch"):
        find_latest_valid(tmp_path)
    assert find_latest_valid(tmp_path / "nothing here") is None


def test_stale_or_corrupt_latest_pointer_is_ignored(tmp_path, capsys):
    (first, second, third), _ = save_steps(tmp_path)
    pointer = tmp_path / "latest"
    pointer.write_text("step_00000099\n")  # names a checkpoint that is gone
    assert find_latest_valid(tmp_path) == third
    assert capsys.readouterr().err == (f"moetrain: ignoring {pointer}: it names 'step_00000099', which is not a "
                                       "complete checkpoint; using the newest step\n")
    pointer.write_bytes(b"\xff\xfe garbage")
    assert find_latest_valid(tmp_path) == third
    assert "it is unreadable" in capsys.readouterr().err
    pointer.write_text("step_00000002\n")  # a rollback: the pointer wins over a higher step, as in find_latest
    assert find_latest_valid(tmp_path) == second == find_latest(tmp_path)
    flip_byte(second / "__0_0.distcp")  # ... unless the checkpoint it names is damaged
    assert find_latest_valid(tmp_path) == third
    assert f"skipping checkpoint {second}: checksum mismatch" in capsys.readouterr().err
    assert find_latest(tmp_path, verify=True) == third


def test_checkpoint_that_cannot_be_checked_is_skipped(tmp_path, capsys):
    (older, newest), _ = save_steps(tmp_path, steps=(1, 2))
    make_legacy(newest)
    metadata = ckpt.read_metadata_safely(newest)
    metadata.storage_data = {"model/dense.bias": object()}  # parses, but is not DCP storage info
    real = ckpt.read_metadata_safely
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ckpt, "read_metadata_safely", lambda path: metadata if Path(path) == newest else real(path))
        assert verify_checkpoint(newest) == (f"{newest}: it cannot be checked (AttributeError: 'object' object has "
                                             "no attribute 'relative_path')")
        assert find_latest_valid(tmp_path) == older


def test_incomplete_directory_does_not_verify(tmp_path):
    (path,), _ = save_steps(tmp_path, steps=(1,))
    (path / "COMPLETE").unlink()
    assert "has no COMPLETE marker" in verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a complete checkpoint") as error:
        load_checkpoint(path, Tiny())
    assert "damaged" not in str(error.value)  # nothing to add to the marker message


def test_metadata_damage_that_still_parses_is_reported_with_the_mismatch(tmp_path):
    (path,), _ = save_steps(tmp_path, steps=(1,))
    metadata = ckpt.read_metadata_safely(path)
    metadata.state_dict_metadata["model/dense.bias"].size = torch.Size([5])  # a "flipped" shape
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, Tiny())
    message = str(error.value)
    assert "'model/dense.bias' has shape [5]" in message and "checksum mismatch in .metadata" in message
    assert "\n" not in message
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, Tiny(), verify=False)
    assert "damaged" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints written before checksums existed
# ----------------------------------------------------------------------------------------------------------------


def make_legacy(path: Path) -> None:
    """Turn `path` into what the previous moetrain version wrote: no manifest, no announcement of one."""
    (path / "checksums.json").unlink()
    meta = json.loads((path / "moetrain.json").read_text())
    del meta["checksums"], meta["trainer"]
    (path / "moetrain.json").write_text(json.dumps(meta))


def test_checkpoint_without_manifest_loads_after_a_structural_check(tmp_path, capsys):
    (older, path), _ = save_steps(tmp_path, steps=(1, 2))
    make_legacy(path)
    assert verify_checkpoint(path) is None
    assert read_trainer_state(path) == {}
    capsys.readouterr()
    assert loaded_step(path) == 2.0
    assert capsys.readouterr().err == (f"moetrain: checkpoint {path} predates checksums: its files were checked to "
                                       "exist, their contents were not verified\n")
    shard = path / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:100])
    assert verify_checkpoint(path) == f"{path}: __0_0.distcp is truncated (100 of at least {size} bytes)"
    shard.unlink()
    assert verify_checkpoint(path) == f"{path}: __0_0.distcp is missing"
    assert find_latest_valid(tmp_path) == older


# ----------------------------------------------------------------------------------------------------------------
# DCP failures become one line
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, cause", [
    (lambda p: (p / "__0_0.distcp").unlink(), "FileNotFoundError: [Errno 2] No such file or directory"),
    (lambda p: (p / "__0_0.distcp").write_bytes(b"\0" * 64), "EOFError;"),
    (lambda p: flip_byte(p / "__0_0.distcp", 0.0), "UnpicklingError: tensor data does not unpickle "
                                                   "(UnpicklingError: Unsupported operand 175);"),
    (lambda p: zero_end_of_first_entry(p / "__0_0.distcp"),
     "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory.;"),
])
def test_dcp_read_errors_are_one_line(tmp_path, damage, cause):
    (path,), _ = save_steps(tmp_path, steps=(1,))
    damage(path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, Tiny(), verify=False)
    message = str(error.value)
    assert message.startswith(f"loading checkpoint {path} failed: {cause}") and "\n" not in message, message
    assert message.endswith("the checkpoint is damaged or unreadable: check it with verify_checkpoint and resume "
                            "from an older one")


def test_dcp_unpickling_error_while_reading_is_one_line(tmp_path, monkeypatch):
    (path,), _ = save_steps(tmp_path, steps=(1,))

    def broken_load(*args, **kwargs):
        raise pickle.UnpicklingError("invalid load key, '\\x00'.\nsecond line")

    monkeypatch.setattr(torch, "load", broken_load)
    with pytest.raises(CheckpointError, match=r"^loading checkpoint .* failed: UnpicklingError: invalid load key, "
                                              r"'\\x00'\.; the checkpoint is damaged") as error:
        load_checkpoint(path, Tiny())
    assert "\n" not in str(error.value)


def test_dcp_write_error_is_one_line_and_removes_the_partial_directory(tmp_path, monkeypatch):
    (first,), model = save_steps(tmp_path, steps=(1,))

    def failing_write(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(dcp_filesystem, "_write_item", failing_write)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(tmp_path, 2, model, None)
    assert str(error.value) == (f"writing checkpoint {tmp_path / 'step_00000002'} failed: OSError: [Errno 5] "
                                "Input/output error; the previous checkpoint step_00000001 is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    assert verify_checkpoint(first) is None


# ----------------------------------------------------------------------------------------------------------------
# Disk full
# ----------------------------------------------------------------------------------------------------------------


def torch_style_enospc(*args, **kwargs):
    """What torch.save does on a full disk: the OSError survives only as the context of a RuntimeError."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def no_space(root: Path, step: int, previous: str) -> str:
    return (f"no space left on {ckpt._mount_point(root)} while writing checkpoint {root / f'step_{step:08d}'}; "
            f"{previous}; free space there (or lower keep) and save again")


@pytest.mark.parametrize("where", ["shard", "moetrain.json"])
def test_disk_full_names_the_device_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    (first,), model = save_steps(tmp_path, steps=(1,))
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    with monkeypatch.context() as m:
        if where == "shard":
            m.setattr(dcp_filesystem, "_write_item", torch_style_enospc)
        else:
            def full(*args):
                raise OSError(errno.ENOSPC, "No space left on device")
            m.setattr(ckpt, "_write_synced", full)
        with pytest.raises(CheckpointError) as error:
            save_checkpoint(tmp_path, 2, model, None)
    assert str(error.value) == no_space(tmp_path, 2, "the previous checkpoint step_00000001 is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # no .tmp left
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before and verify_checkpoint(first) is None


def test_disk_full_without_a_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(dcp_filesystem, "_write_item", torch_style_enospc)
    with pytest.raises(CheckpointError, match="; there is no previous checkpoint; "):
        save_checkpoint(tmp_path, 1, Tiny(), None)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_on_a_real_tiny_tmpfs(tiny_tmpfs):
    root = tiny_tmpfs / "checkpoints"
    (first,), _ = save_steps(root, steps=(1,))
    big = Tiny(width=160)  # 2 x 160 x 160 x 4 bytes of experts alone: more than the 256 KiB file system
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(root, 2, big, None)
    assert str(error.value) == no_space(root, 2, "the previous checkpoint step_00000001 is intact")
    assert ckpt._mount_point(root) == tiny_tmpfs
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert verify_checkpoint(first) is None and loaded_step(first) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Non-finite weights, trainer state
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path, poison):
    (first,), model = save_steps(tmp_path, steps=(1,))
    with torch.no_grad():
        model.experts[1, 2, 3] = poison
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(tmp_path, 2, model, torch.optim.AdamW(model.parameters()))
    assert str(error.value) == (f"refusing to write checkpoint {tmp_path / 'step_00000002'}: model weight experts "
                                "holds NaN/inf; the previous checkpoint step_00000001 is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    with pytest.raises(CheckpointError, match="there is no previous checkpoint"):
        save_checkpoint(tmp_path / "fresh", 1, model, None)
    assert not (tmp_path / "fresh").exists()


def test_trainer_state_round_trips_as_json(tmp_path):
    state = {"pipeline_degree": 4, "fssdp_owners": {"layer.0": [[0, 1], [2, 3]]}, "lr_scale": 0.5,
             "note": "tuned", "done": True, "unset": None}
    (with_state,), _ = save_steps(tmp_path, steps=(1,), trainer_state=state)
    assert read_trainer_state(with_state) == state
    assert json.loads((with_state / "moetrain.json").read_text())["trainer"] == state  # plain JSON, no pickles
    (without,), _ = save_steps(tmp_path / "plain", steps=(1,))
    assert read_trainer_state(without) == {}


@pytest.mark.parametrize("state, complaint", [
    ({"degree": (2, 4)}, r"trainer_state\['degree'\] is a tuple"),
    ({"owners": {0: [1]}}, r"trainer_state\['owners'\] has the int key 0"),
    ({"scale": float("nan")}, r"trainer_state\['scale'\] is nan"),
    ({"t": torch.tensor(1)}, r"trainer_state\['t'\] is a Tensor"),
    ([1, 2], r"trainer_state is a list"),
])
def test_trainer_state_that_is_not_json_is_refused(tmp_path, state, complaint):
    with pytest.raises(CheckpointError, match=complaint):
        save_checkpoint(tmp_path, 1, Tiny(), None, trainer_state=state)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Pruning and re-saving
# ----------------------------------------------------------------------------------------------------------------


def test_prune_after_a_fallback_keeps_the_intact_checkpoint(tmp_path):
    (first, second, third), model = save_steps(tmp_path)
    flip_byte(third / "__0_0.distcp")
    assert find_latest_valid(tmp_path) == second
    fourth = save_checkpoint(tmp_path, 4, model, None, keep=2)
    # The damaged step 3 does not count towards keep=2: the intact step 2 survives, step 3 and step 1 go.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert find_latest_valid(tmp_path) == fourth
    save_checkpoint(tmp_path, 3, model, None, keep=5)  # re-saving a step clears its damaged mark
    save_checkpoint(tmp_path, 5, model, None, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000005"]


def test_failed_rename_of_a_resaved_step_puts_the_old_copy_back(tmp_path, monkeypatch):
    (first, second), model = save_steps(tmp_path, steps=(1, 2))
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith("step_00000002.tmp"):
            raise OSError(errno.EIO, "rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(CheckpointError, match="rename failed"):
        save_checkpoint(tmp_path, 2, model, None)
    monkeypatch.undo()
    assert verify_checkpoint(second) is None and loaded_step(second) == 2.0
    assert find_latest_valid(tmp_path) == second


# ----------------------------------------------------------------------------------------------------------------
# Two ranks
# ----------------------------------------------------------------------------------------------------------------


def _two_rank_faults(rank, world_size, root):
    root = Path(root)
    local = [2 * rank, 2 * rank + 1]  # ep=2: each rank writes its own experts into __<rank>_0.distcp
    model = Tiny(local)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        stamp(model, float(step))
        save_checkpoint(root, step, model, optimizer)
    newest = root / "step_00000002"
    out = {"written_by_1": (newest / "__1_0.distcp").stat().st_size}

    # The ranks share the verification: every data file is checksummed by exactly one rank.
    checked, real = [], ckpt.file_checksum
    ckpt.file_checksum = lambda path: (checked.append(Path(path).name), real(path))[1]
    out["verdict_intact"] = verify_checkpoint(newest)
    ckpt.file_checksum = real
    out["checked"] = sorted(n for n in checked if n.endswith(".distcp"))

    # Rank 1's shard is damaged: both ranks see the same verdict, the same error and the same fallback.
    dist.barrier()
    if rank == 0:
        flip_byte(newest / "__1_0.distcp")
    dist.barrier()
    out["verdict"] = verify_checkpoint(newest)
    fresh = Tiny(local)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(newest, fresh, torch.optim.AdamW(fresh.parameters()))
    out["load_error"] = str(error.value)
    out["fallback"] = str(find_latest_valid(root))
    out["fallback_step"] = loaded_step(Path(out["fallback"]), local, verify=False)

    # Disk full on rank 1 only, reported the torch way (the ENOSPC only in __context__): every rank gets it.
    if rank == 1:
        dcp_filesystem._write_item = torch_style_enospc
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(root, 3, model, optimizer)
    out["enospc"] = str(error.value)
    out["after_enospc"] = sorted(p.name for p in root.iterdir())

    # NaN on rank 1 only: refused on every rank before anything is written.
    with torch.no_grad():
        model.experts[0, 0, 0] = float("nan") if rank == 1 else 0.0
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(root, 4, model, optimizer)
    out["nan"] = str(error.value)
    out["after_nan"] = sorted(p.name for p in root.iterdir())
    return out


def test_two_ranks_agree_on_damage_disk_full_and_non_finite_weights(tmp_path):
    rank0, rank1 = run_distributed(_two_rank_faults, 2, str(tmp_path))
    newest = tmp_path / "step_00000002"
    assert rank0["written_by_1"] > 0
    assert rank0["verdict_intact"] is None and rank1["verdict_intact"] is None
    assert rank0["checked"] == ["__0_0.distcp"] and rank1["checked"] == ["__1_0.distcp"]

    assert rank0["verdict"] == rank1["verdict"] == f"{newest}: checksum mismatch in __1_0.distcp"
    assert rank0["load_error"] == rank1["load_error"] == (
        f"cannot load checkpoint {newest}: checksum mismatch in __1_0.distcp; resume from an older one "
        "(find_latest_valid(root) picks the newest intact checkpoint)")
    assert rank0["fallback"] == rank1["fallback"] == str(tmp_path / "step_00000001")
    assert rank0["fallback_step"] == rank1["fallback_step"] == 1.0

    # latest still points at the damaged step 2 (only a fresh save moves it); the failed step 3 left nothing.
    assert rank0["enospc"] == rank1["enospc"] == no_space(tmp_path, 3,
                                                         "the previous checkpoint step_00000002 is intact")
    assert rank0["after_enospc"] == ["latest", "step_00000001", "step_00000002"]

    refusal = (f"refusing to write checkpoint {tmp_path / 'step_00000004'}: model weight experts holds NaN/inf; "
               "the previous checkpoint step_00000002 is intact")
    assert rank1["nan"] == refusal and rank0["nan"] == f"rank 1 failed: {refusal}"
    assert rank0["after_nan"] == ["latest", "step_00000001", "step_00000002"]
