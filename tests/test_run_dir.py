"""Run directories written by converters: round trip, refusal to overwrite, and training that starts from them."""

import math

import pytest
import torch

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.interop import ConvertError
from moetrain.interop.run_dir import load_run_model, read_run_config, write_run_dir
from moetrain.model.transformer import TransformerLM
from tests.train_utils import losses, overrides


def _model(args, seed):
    cfg = compose_config(args)
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(seed)
    return cfg, model


def test_write_then_load_round_trip(tmp_path):
    out = tmp_path / "run"
    cfg, model = _model(overrides(out, tmp_path / "cache", "router=top_p"), seed=3)
    path = write_run_dir(out, cfg, model)
    assert path.name == "step_00000000"
    loaded_cfg, loaded = load_run_model(out)
    assert loaded_cfg.model == cfg.model and loaded_cfg.router == cfg.router
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    _, again = load_run_model(path)  # a checkpoint directory works too
    assert torch.equal(again.output.weight, model.output.weight)


def test_an_existing_checkpoint_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    cfg, model = _model(overrides(out, tmp_path / "cache"), seed=3)
    write_run_dir(out, cfg, model)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with torch.no_grad():
        model.output.weight.zero_()
    with pytest.raises(ConvertError, match="already holds a checkpoint"):
        write_run_dir(out, cfg, model)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    _, loaded = load_run_model(out)
    assert loaded.output.weight.abs().sum() > 0


def test_missing_run_pieces_are_one_line(tmp_path):
    with pytest.raises(ConvertError, match="not a moetrain run directory"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("model:\n  dim: 32\n")
    with pytest.raises(ConvertError, match="holds no valid checkpoint"):
        load_run_model(tmp_path)


def test_training_starts_from_the_written_weights(tmp_path, capsys):
    """The trainer takes a weights-only checkpoint as its starting weights (fresh optimizer): with the output
    projection zeroed, the first step's loss is exactly ln(256) (uniform logits), which no fresh start gives."""
    out = tmp_path / "run"
    args = overrides(out, tmp_path / "cache", "trainer.max_steps=3", "optim.lr=1e-2")
    cfg, model = _model(args, seed=5)
    with torch.no_grad():
        model.output.weight.zero_()
    write_run_dir(out, cfg, model)
    assert train_main(args) == 0
    assert "starting from the weights of" in capsys.readouterr().err
    curve = losses(out)
    assert curve[1] == pytest.approx(math.log(256), abs=1e-6)
    assert curve[3] < curve[1]
