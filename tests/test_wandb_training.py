"""A short training with the wandb logger offline: the routing metrics read back from the offline run (through
wandb's own protobuf records) equal those in metrics.jsonl, and no API key lands in the run directory."""

import pytest

from moetrain.cli import train_main
from tests.train_utils import overrides, read_metrics

pytest.importorskip("wandb")


def test_wandb_offline_metrics_equal_jsonl(tmp_path, monkeypatch):
    from moetrain.telemetry.wandb_reader import read_offline_history

    fake_key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = overrides(run, tmp_path / "cache", "trainer.max_steps=6", "logger.wandb=true", "logger.wandb_mode=offline",
                     "router.aux_loss_coeff=0.01")
    assert train_main(args) == 0
    rows = {r["step"]: r for r in read_metrics(run)}
    history = {int(h["step"]): h for h in read_offline_history(run) if "step" in h}
    assert sorted(history) == sorted(rows) == list(range(1, 7))
    keys = [k for k in rows[1] if k.startswith("moe/") and isinstance(rows[1][k], (int, float))]
    assert any(k.endswith("/max_vio") for k in keys) and any(k.endswith("/bias_std") for k in keys)
    for step, row in rows.items():
        for key in keys + ["loss", "aux_loss", "lr"]:
            assert history[step][key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (step, key)
    for path in run.rglob("*"):
        if path.is_file():
            assert fake_key.encode() not in path.read_bytes(), f"API key written to {path}"
