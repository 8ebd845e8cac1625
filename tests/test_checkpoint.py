"""Tests for moetrain.train.checkpoint: round trip, atomicity, pruning, safe loading and expert resharding."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from moetrain.train import checkpoint as ckpt
from moetrain.train.checkpoint import CheckpointError, find_latest, load_checkpoint, save_checkpoint
from moetrain.train.safe_metadata import SafeFileSystemReader, read_metadata_safely
from tests.distributed import run_distributed

N_EXPERTS = 4


class ToyMoE(nn.Module):
    """A dense Linear, a persistent buffer and one stacked expert parameter holding the experts `expert_ids`."""

    def __init__(self, expert_ids: list[int], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dense = nn.Linear(4, 4)
        with torch.no_grad():
            self.dense.weight.copy_(torch.randn(4, 4, generator=g))
            self.dense.bias.copy_(torch.randn(4, generator=g))
        all_experts = torch.randn(N_EXPERTS, 4, 8, generator=g)
        self.w_EDF = nn.Parameter(all_experts[list(expert_ids)].clone())
        self.w_EDF.expert_ids = list(expert_ids)
        self.register_buffer("router_bias_E", torch.randn(N_EXPERTS, generator=g))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def loss(self, step: int) -> torch.Tensor:
        # Separable in the experts: every rank computes the same dense gradient and the same gradient per expert,
        # whichever experts it holds.
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + step))
        dense = self.dense(x).pow(2).mean()
        experts = torch.einsum("bd,edf->ebf", x, self.w_EDF).pow(2).mean(dim=(1, 2)).sum()
        return dense + experts


def make_optimizer(model: ToyMoE) -> torch.optim.AdamW:
    return torch.optim.AdamW([{"params": [model.dense.weight, model.dense.bias]},
                              {"params": [model.w_EDF], "lr": 3e-2, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)


def lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + step)


def train(model, optimizer, steps, scheduler=None, first=0):
    for step in range(first, first + steps):
        optimizer.zero_grad()
        model.loss(step).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def trained(expert_ids, steps=2):
    model = ToyMoE(expert_ids)
    optimizer = make_optimizer(model)
    train(model, optimizer, steps)
    return model, optimizer


def snapshot(model, optimizer=None, expand=True) -> dict[str, torch.Tensor]:
    """Model and optimizer state as `model/<fqn>`, `optim/<fqn>/<key>`; expert rows as `.../expert/<id>`."""
    out = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    if optimizer is not None:
        for fqn, state in get_optimizer_state_dict(model, optimizer)["state"].items():
            out.update({f"optim/{fqn}/{k}": v.clone() for k, v in state.items()})
    if not expand:
        return out
    ids = model.w_EDF.expert_ids
    expanded = {}
    for key, value in out.items():
        if "/w_EDF" in key and value.dim() > 0:
            expanded.update({f"{key}/expert/{e}": value[row] for row, e in enumerate(ids)})
        else:
            expanded[key] = value
    return expanded


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def as_lists(state: dict[str, torch.Tensor]):
    """Picklable copy for returning from a rank (tensors through a queue would need the sender alive)."""
    return {k: (str(v.dtype), v.tolist()) for k, v in state.items()}


def from_lists(state):
    return {k: torch.tensor(v, dtype=getattr(torch, d.removeprefix("torch."))) for k, (d, v) in state.items()}


# ----------------------------------------------------------------------------------------------------------------
# Single process
# ----------------------------------------------------------------------------------------------------------------


def test_round_trip_and_identical_continuation(tmp_path):
    model = ToyMoE(list(range(N_EXPERTS)))
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    train(model, optimizer, 2, scheduler)
    torch.manual_seed(1234)
    extra = {"step": torch.tensor(2), "data_pos": torch.tensor([5, 7]), "rng": torch.get_rng_state()}
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, extra=extra)
    assert path == tmp_path / "step_00000002" and (path / "COMPLETE").is_file()
    assert find_latest(tmp_path) == path and (tmp_path / "latest").read_text().strip() == "step_00000002"
    expected_draw = torch.rand(3)

    model2 = ToyMoE(list(range(N_EXPERTS)), seed=7)
    optimizer2 = make_optimizer(model2)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lr_lambda)
    rng_before = torch.empty(0, dtype=torch.uint8)
    dest = {"step": torch.tensor(0), "data_pos": torch.zeros(2, dtype=torch.int64), "rng": rng_before}
    step_tensor = dest["step"]
    load_checkpoint(path, model2, optimizer2, scheduler2, extra=dest)

    assert_same(snapshot(model2, optimizer2), snapshot(model, optimizer))
    assert dest["step"] is step_tensor and dest["step"].item() == 2  # filled in place
    assert dest["data_pos"].tolist() == [5, 7]
    assert dest["rng"] is not rng_before and torch.equal(dest["rng"], extra["rng"])  # replaced: other shape
    torch.set_rng_state(dest["rng"])
    assert torch.equal(torch.rand(3), expected_draw)
    for group, group2 in zip(optimizer.param_groups, optimizer2.param_groups):
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in group2.items() if k != "params"}
    assert optimizer2.param_groups[0]["betas"] == (0.8, 0.95)
    assert scheduler2.state_dict() == scheduler.state_dict()

    train(model, optimizer, 2, scheduler, first=2)
    train(model2, optimizer2, 2, scheduler2, first=2)
    assert_same(snapshot(model2, optimizer2), snapshot(model, optimizer))
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_key_layout(tmp_path):
    model, optimizer = trained([2, 0, 3, 1])
    path = save_checkpoint(tmp_path, 5, model, optimizer, extra={"step": torch.tensor(5)})
    keys = set(read_metadata_safely(path).state_dict_metadata)
    experts = [f"/expert/{e}" for e in range(N_EXPERTS)]
    assert keys == ({"model/dense.weight", "model/dense.bias", "model/router_bias_E", "extra/step"}
                    | {f"model/w_EDF{e}" for e in experts}
                    | {f"optim/dense.{p}/{k}" for p in ("weight", "bias") for k in ("exp_avg", "exp_avg_sq", "step")}
                    | {f"optim/w_EDF/{k}{e}" for k in ("exp_avg", "exp_avg_sq") for e in experts}
                    | {"optim/w_EDF/step"})
    # Row i of the local tensor is stored under its global id.
    fresh = ToyMoE([0, 1, 2, 3], seed=3)
    load_checkpoint(path, fresh)
    assert torch.equal(fresh.w_EDF[2], model.w_EDF[0]) and torch.equal(fresh.w_EDF[1], model.w_EDF[3])


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path, monkeypatch):
    model, optimizer = trained([0, 1, 2, 3])
    first = save_checkpoint(tmp_path, 1, model, optimizer)

    def crash(*args):
        raise OSError("simulated crash before the rename")

    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "replace", crash)
        with pytest.raises(CheckpointError, match="simulated crash"):
            save_checkpoint(tmp_path, 2, model, optimizer)
    assert (tmp_path / "step_00000002.tmp" / "COMPLETE").is_file()  # fully written but never renamed
    assert find_latest(tmp_path) == first
    (tmp_path / "latest").write_text("../../etc\n")  # a corrupt pointer falls back to scanning
    assert find_latest(tmp_path) == first
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == first
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_00000002.tmp", model)

    third = save_checkpoint(tmp_path, 3, model, optimizer)
    assert find_latest(tmp_path) == third
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001", "step_00000003"]
    assert find_latest(tmp_path / "missing") is None


def test_keep_prunes_old_checkpoints(tmp_path):
    model, optimizer = trained([0, 1, 2, 3], steps=1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    # Re-saving an older step (after a rollback) never deletes the checkpoint just written.
    rolled_back = save_checkpoint(tmp_path, 2, model, optimizer, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert find_latest(tmp_path) == rolled_back
    # Re-saving an existing step replaces it.
    save_checkpoint(tmp_path, 2, model, optimizer, keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    with pytest.raises(CheckpointError, match="keep >= 1"):
        save_checkpoint(tmp_path, 5, model, optimizer, keep=0)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_metadata_is_refused(tmp_path):
    model, optimizer = trained([0, 1, 2, 3], steps=1)
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    metadata = read_metadata_safely(path)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        load_checkpoint(path, model)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle posix\.system from .*\.metadata: "
                                              "not a checkpoint metadata type"):
        load_checkpoint(path, model, optimizer)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        SafeFileSystemReader(str(path)).read_metadata()
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_non_tensor_entries_are_never_unpickled(tmp_path):
    model, optimizer = trained([0, 1, 2, 3], steps=1)
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    # Forge metadata that declares a pickled ("bytes") entry under a key the loader asks for.
    metadata = read_metadata_safely(path)
    metadata.state_dict_metadata["model/dense.bias"] = BytesStorageMetadata()
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="'model/dense.bias' of checkpoint .* is not a tensor"):
        load_checkpoint(path, model)
    # The reader itself refuses to read a bytes entry even with DCP's default planner.
    bytes_dir = tmp_path / "bytes"
    dcp.save({"obj": {"a": io.BytesIO(b"x")}}, checkpoint_id=str(bytes_dir), no_dist=True)
    with pytest.raises(CheckpointException) as error:  # DCP wraps the reader's error with the failing rank
        dcp.load({"obj": {"a": None}}, storage_reader=SafeFileSystemReader(str(bytes_dir)), no_dist=True)
    (reader_error, _), = error.value.failures.values()
    assert isinstance(reader_error, CheckpointError) and "refusing to load non-tensor entry 'obj.a'" in str(reader_error)


def test_tensor_data_is_loaded_weights_only(tmp_path, monkeypatch):
    model, optimizer = trained([0, 1, 2, 3], steps=1)
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    calls, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    fresh = ToyMoE([0, 1, 2, 3], seed=5)
    load_checkpoint(path, fresh, make_optimizer(fresh))
    assert calls and all(flag is True for flag in calls)


def test_missing_entries_name_the_key_and_checkpoint(tmp_path):
    model, optimizer = trained([0, 1, 2, 3], steps=1)
    path = save_checkpoint(tmp_path, 1, model, optimizer, extra={"step": torch.tensor(1)})

    bigger = ToyMoE([0, 1, 2, 3])
    bigger.head = nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match=f"model mismatch: checkpoint {path} has no entry for "
                                              r"'model/head.weight'; was it written by a different model config\?"):
        load_checkpoint(path, bigger)
    more_experts = ToyMoE([0, 1, 2, 3])
    more_experts.w_EDF.expert_ids = [0, 1, 2, 9]
    with pytest.raises(CheckpointError, match=r"'model/w_EDF/expert/9'; it holds experts \[0, 1, 2, 3\]"):
        load_checkpoint(path, more_experts)
    with pytest.raises(CheckpointError, match=r"extra mismatch: .* 'extra/rng'; it holds extra entries \['step'\]"):
        load_checkpoint(path, ToyMoE([0, 1, 2, 3]), extra={"rng": torch.empty(0, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="has no scheduler state"):
        load_checkpoint(path, model, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda))
    bad_ids = ToyMoE([0, 1])
    bad_ids.w_EDF.expert_ids = [0]
    with pytest.raises(CheckpointError, match="expert_ids must give the global id of every dim-0 row"):
        save_checkpoint(tmp_path, 2, bad_ids, None)


# ----------------------------------------------------------------------------------------------------------------
# Distributed (gloo): expert resharding and data-parallel replicas
# ----------------------------------------------------------------------------------------------------------------


def _save_sharded_and_replicated(rank, world_size, root):
    local = [2 * rank, 2 * rank + 1]  # ep=2: rank r holds experts [2r, 2r+2)
    model, optimizer = trained(local)
    save_checkpoint(Path(root) / "ep", 2, model, optimizer, extra={"step": torch.tensor(2)})
    ep_state = snapshot(model, optimizer)
    model, optimizer = trained(list(range(N_EXPERTS)))  # data parallel: full identical replicas
    save_checkpoint(Path(root) / "dp", 2, model, optimizer)
    return as_lists(ep_state)


def test_two_ranks_save_one_process_loads_and_replicas_are_written_once(tmp_path):
    ep_states = [from_lists(s) for s in run_distributed(_save_sharded_and_replicated, 2, str(tmp_path))]
    expected = {**ep_states[0], **ep_states[1]}
    for key in set(ep_states[0]) & set(ep_states[1]):  # dense entries are identical on both ranks
        assert torch.equal(ep_states[0][key], ep_states[1][key]), key

    full, optimizer = ToyMoE(list(range(N_EXPERTS)), seed=11), None
    optimizer = make_optimizer(full)
    load_checkpoint(find_latest(tmp_path / "ep"), full, optimizer)
    assert_same(snapshot(full, optimizer), expected)

    reference_model, reference_optimizer = trained(list(range(N_EXPERTS)))
    path = find_latest(tmp_path / "dp")
    metadata = read_metadata_safely(path)
    assert all(len(md.chunks) == 1 for md in metadata.state_dict_metadata.values())
    assert len(metadata.storage_data) == len(metadata.state_dict_metadata)  # every entry written exactly once
    loaded = ToyMoE(list(range(N_EXPERTS)), seed=12)
    loaded_optimizer = make_optimizer(loaded)
    load_checkpoint(path, loaded, loaded_optimizer)
    assert_same(snapshot(loaded, loaded_optimizer), snapshot(reference_model, reference_optimizer))


def _load_halves(rank, world_size, path):
    local = [[3, 0], [2, 1]][rank]  # arbitrary, non-contiguous placement
    model = ToyMoE(local, seed=20 + rank)
    optimizer = make_optimizer(model)
    load_checkpoint(Path(path), model, optimizer)
    state = snapshot(model, optimizer)
    # A failure on one rank is raised on every rank instead of leaving the others waiting.
    wrong = ToyMoE(local)
    if rank == 1:
        wrong.w_EDF.expert_ids = [2, 7]
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(Path(path), wrong)
    return as_lists(state), str(error.value)


def test_one_process_saves_two_ranks_load_their_experts(tmp_path):
    model, optimizer = trained(list(range(N_EXPERTS)))
    path = save_checkpoint(tmp_path, 2, model, optimizer)
    expected = snapshot(model, optimizer)
    results = run_distributed(_load_halves, 2, str(path))
    for rank, (state, error) in enumerate(results):
        state = from_lists(state)
        assert_same(state, {k: v for k, v in expected.items() if k in state})
        assert "'model/w_EDF/expert/7'" in error and (rank == 1 or error.startswith("rank 1 failed"))
    assert {k for s, _ in results for k in s} == set(expected)
