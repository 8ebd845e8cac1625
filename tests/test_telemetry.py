"""Routing statistics, loggers, the offline wandb round trip and the report CLI.

Legend: T tokens, E experts.
"""

import importlib.util
import io
import json
import math

import pytest
import torch

from moetrain.config.schema import LoggerConfig
from moetrain.telemetry import loggers as loggers_mod
from moetrain.telemetry.loggers import WANDB_MISSING, ConsoleLogger, JsonlLogger, MultiLogger, build_loggers
from moetrain.telemetry.report import main as report_main
from moetrain.telemetry.routing_stats import RoutingWindow, layer_metrics, max_vio, router_entropy

# ---- routing statistics -------------------------------------------------------------------------------------------


def test_max_vio():
    assert max_vio([2, 2, 2, 2]) == 0.0
    assert max_vio(torch.tensor([4, 2, 1, 1])) == pytest.approx(1.0)  # (4 - 2) / 2
    assert max_vio([0, 0, 0]) == 0.0
    assert max_vio([]) == 0.0


def test_router_entropy():
    assert router_entropy(torch.full((3, 4), 0.25)) == pytest.approx(math.log(4))
    assert router_entropy(torch.tensor([[1.0, 0.0, 0.0]])) == pytest.approx(0.0)
    assert router_entropy(torch.tensor([[0.9, 0.9]])) == pytest.approx(math.log(2))  # sigmoid scores normalised
    assert router_entropy(torch.zeros(0, 4)) == 0.0


def test_routing_window_global_max_vio():
    window = RoutingWindow()
    window.add(0, torch.tensor([4, 0]))
    window.add(0, torch.tensor([0, 4]))  # each batch MaxVio 1, the window's sum is balanced
    window.add(2, [3, 1, 0, 0])
    window.add(2, [3, 1, 0, 0])
    out = window.summary()
    assert out["moe/layer0/max_vio_global"] == 0.0
    assert out["moe/layer2/max_vio_global"] == pytest.approx(2.0)  # (6 - 2) / 2
    assert out["moe/layer2/tokens_per_expert_window"] == [6, 2, 0, 0]
    assert window.summary() == {}  # reset
    window.add(0, [1, 2])
    with pytest.raises(ValueError, match="experts"):
        window.add(0, [1, 2, 3])


def test_layer_metrics_keys():
    out = layer_metrics(3, torch.tensor([4, 2, 1, 1]))
    assert out == {"moe/layer3/tokens_per_expert": [4, 2, 1, 1], "moe/layer3/max_vio": 1.0}
    out = layer_metrics(
        1,
        [2, 2],
        scores_TE=torch.full((5, 2), 0.5),
        bias_E=torch.tensor([-0.1, 0.3]),
        dropped_frac=0.25,
        rank_loads=[30, 10],
    )
    assert out["moe/layer1/entropy"] == pytest.approx(math.log(2))
    assert out["moe/layer1/bias_min"] == pytest.approx(-0.1)
    assert out["moe/layer1/bias_max"] == pytest.approx(0.3)
    assert out["moe/layer1/bias_std"] == pytest.approx(0.2)
    assert out["moe/layer1/dropped_frac"] == 0.25
    assert out["moe/layer1/rank_load_max_over_mean"] == pytest.approx(1.5)


# ---- loggers ----------------------------------------------------------------------------------------------------


def test_jsonl_logger_lines(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log(1, {"loss": 2.5, "moe/layer0/tokens_per_expert": torch.tensor([3, 1]), "lr": torch.tensor(1e-3)})
    logger.log(2, {"loss": 2.0})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 2.5, "moe/layer0/tokens_per_expert": [3, 1], "lr": pytest.approx(1e-3)}
    assert rows[1] == {"step": 2, "loss": 2.0}
    JsonlLogger(path).close()  # appends, never truncates
    assert len(path.read_text().splitlines()) == 2


def test_console_line():
    stream = io.StringIO()
    metrics = {
        "loss": 3.14159,
        "lr": 3e-3,
        "tokens_per_s": 12345.6,
        "moe/layer0/max_vio": 0.25,
        "moe/layer1/max_vio": 0.5,
        "moe/layer0/tokens_per_expert": [1, 2],
    }
    ConsoleLogger(stream).log(10, metrics)
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert line.strip() == "step     10 | loss 3.1416 | lr 3.00e-03 | tok/s 12,346 | maxvio 0.500"


def test_build_loggers_rank_nonzero_is_noop(tmp_path):
    cfg = LoggerConfig(console=True, jsonl=True)
    multi = build_loggers(cfg, tmp_path / "run", rank=1, config_dict={})
    assert isinstance(multi, MultiLogger) and multi.loggers == []
    multi.log(0, {"loss": 1.0})
    multi.close()
    assert not (tmp_path / "run").exists()
    multi = build_loggers(LoggerConfig(console=False, jsonl=True), tmp_path / "run", rank=0, config_dict=None)
    multi.log(0, {"loss": 1.0})
    multi.close()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 0, "loss": 1.0}


def test_build_loggers_wandb_missing(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        loggers_mod.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError) as info:
        build_loggers(LoggerConfig(wandb=True), tmp_path, rank=1, config_dict=None)
    assert str(info.value) == WANDB_MISSING


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from moetrain.telemetry.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log(1, {"loss": 1.0, "moe/layer0/tokens_per_expert": [3, 0, 1], "other": [0.1, 0.2]})
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_wandb_offline_round_trip(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from moetrain.telemetry.loggers import WandbLogger
    from moetrain.telemetry.wandb_reader import read_offline_history

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger("moetrain-test", tmp_path, mode="offline", run_name="t", config={"lr": 1e-3},
                         heatmap_every=15)
    logged = []
    for step in range(5):
        metrics = {
            "loss": 4.0 - 0.5 * step,
            "lr": 1e-3 * (step + 1),
            "time/forward_s": 0.01 * step,
            "moe/layer1/max_vio": 0.1 * step,
            "moe/layer1/entropy": 1.3,
            "moe/layer1/bias_std": 1e-3 * step,
            "moe/layer1/tokens_per_expert": [step, 4, 2, 1],
            "moe/layer2/tokens_per_expert": [2, 2, 2, 2],
        }
        logger.log(step * 10, metrics)
        logged.append(metrics)
    logger.close()

    rows = read_offline_history(tmp_path)
    assert len(rows) == 5
    for step, (row, metrics) in enumerate(zip(rows, logged)):
        assert row["step"] == step * 10 and row["_step"] == step
        for key, value in metrics.items():
            if isinstance(value, list):
                assert row[key]["_type"] == "histogram" and row[key]["values"] == value
            else:
                assert row[key] == value, key
    # steps 0, 10, 20, 30, 40 in windows of 15 steps: the first logged step of each window gets the heatmap
    assert [row["step"] for row in rows if "moe/load_heatmap" in row] == [0, 20, 30]
    for row in rows:
        if "moe/load_heatmap" in row:
            heatmap = row["moe/load_heatmap"]
            assert heatmap["_type"] == "image-file" and heatmap["caption"].endswith(f"step {row['step']}"), heatmap


# ---- report -----------------------------------------------------------------------------------------------------


def test_report_renders_pngs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    for step in range(1, 6):
        metrics = {"loss": 5.0 / step, "lr": 1e-3}
        for layer in (1, 2):
            load = [step, 4, 2, 1 + layer]
            metrics.update(layer_metrics(layer, load))
        if step % 2 == 0:
            metrics["val_loss"] = 5.5 / step
            metrics["moe/layer1/max_vio_global"] = 0.3
        logger.log(step, metrics)
    logger.close()
    assert report_main([str(run_dir), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    names = ["loss.png", "max_vio.png", "load_heatmap.png"]
    assert [p.rsplit("/", 1)[-1] for p in printed] == names
    for name in names:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_errors(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moetrain-report: error: ")
    assert report_main([str(tmp_path)]) == 2  # exists, no metrics.jsonl
    assert "metrics.jsonl" in capsys.readouterr().err
