"""Dense models (no MoE layer: model.num_experts=0, or model.first_k_dense >= model.n_layers) train end to end.

A dense model is the baseline an MoE is compared against, so it must take the same path through the trainer: one
process, data parallel over two ranks (matching one process), evaluation, logging and checkpoints.
"""

import pytest
import torch

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.model.transformer import TransformerLM, count_parameters
from tests.distributed import run_distributed
from tests.train_utils import SMALL, losses, overrides, read_metrics

DENSE_VARIANTS = {
    "num_experts=0": ("model.num_experts=0",),
    "first_k_dense=n_layers": ("model.first_k_dense=2",),  # SMALL has model.n_layers=2
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.mark.parametrize("extra", DENSE_VARIANTS.values(), ids=DENSE_VARIANTS.keys())
def test_dense_variants_build_without_moe_layers(extra):
    cfg = compose_config(SMALL + list(extra))
    model = TransformerLM(cfg.model, cfg.router)
    assert list(model.moe_layers()) == []
    logits, records = model(torch.zeros(1, 4, dtype=torch.long), return_records=True)
    assert records == [] and logits.shape == (1, 4, cfg.model.vocab_size)
    counts = count_parameters(cfg.model, cfg.router)
    assert counts["total"] == counts["active"]  # every parameter is used by every token


@pytest.mark.parametrize("extra", DENSE_VARIANTS.values(), ids=DENSE_VARIANTS.keys())
def test_dense_model_trains_and_loss_falls(tmp_path, cache_dir, extra):
    run = tmp_path / "run"
    assert train_main(overrides(run, cache_dir, *extra, "trainer.max_steps=20", "optim.lr=1e-2")) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, (rows[0]["loss"], rows[-1]["loss"])
    assert "val_loss" in rows[-1]
    assert not any(key.startswith("moe/") for row in rows for key in row)  # no routing metrics without routers
    assert (run / "checkpoints" / "latest").is_file()


def _train_body(rank, world_size, args):
    return train_main(args)


def test_dense_ddp_two_ranks_matches_one_process(tmp_path, cache_dir):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ("model.num_experts=0", "trainer.max_steps=6")
    assert train_main(overrides(single, cache_dir, *common)) == 0
    assert run_distributed(_train_body, 2, overrides(multi, cache_dir, *common)) == [0, 0]
    ref, got = losses(single), losses(multi)
    assert sorted(got) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
