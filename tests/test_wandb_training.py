"""A short training with the wandb logger offline: the routing metrics read back from the offline run (through
wandb's own protobuf records) equal those in metrics.jsonl, and no API key lands in the run directory.

The run is the session's shared `wandb_offline_run` (tests/conftest.py), which tests/test_dashboard.py reads too."""

import pytest

from tests.train_utils import read_metrics

pytest.importorskip("wandb")


def test_wandb_offline_metrics_equal_jsonl(wandb_offline_run):
    from moetrain.telemetry.wandb_reader import read_offline_history

    run, fake_key = wandb_offline_run
    rows = {r["step"]: r for r in read_metrics(run)}
    history = {int(h["step"]): h for h in read_offline_history(run) if "step" in h}
    assert sorted(history) == sorted(rows) == list(range(1, 7))
    keys = [k for k in rows[1] if k.startswith("moe/") and isinstance(rows[1][k], (int, float))]
    assert any(k.endswith("/max_vio") for k in keys) and any(k.endswith("/bias_std") for k in keys)
    for step, row in rows.items():
        for key in keys + ["loss", "aux_loss", "lr"]:
            assert history[step][key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (step, key)
    # logger.heatmap_every=2: the first logged step of each 2-step window, titled with its step
    heatmaps = {step: h["moe/load_heatmap"] for step, h in history.items() if "moe/load_heatmap" in h}
    assert sorted(heatmaps) == [1, 2, 4, 6]
    assert all(h["_type"] == "image-file" and h["caption"].endswith(f"step {s}") for s, h in heatmaps.items())
    for path in run.rglob("*"):
        if path.is_file():
            assert fake_key.encode() not in path.read_bytes(), f"API key written to {path}"
