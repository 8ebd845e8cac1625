"""DeepSpeed-MoE checkpoint import: a tiny DeepSpeed-MoE transformer is trained one step and saved through its engine
on CPU (gloo), imported with `import_deepspeed`, and the imported moetrain model must reproduce DeepSpeed's own eval
forward: every MoE layer's output and the logits, in fp32. Expert parallelism ep_size=1 (top-2, dropless, moetrain's
names) and ep_size=2 on two ranks (top-1 with a capacity no token reaches, other names through a name map). Bad input
(a missing expert file, a directory that is no DeepSpeed checkpoint, a GELU expert, missing settings, a pickle that
would run code) is refused with one line and nothing written."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moetrain.interop import ConvertError
from moetrain.interop.deepspeed import import_deepspeed
from moetrain.interop.run_dir import load_run_model
from moetrain.moe.layer import MoELayer
from tests.distributed import run_distributed

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed "
                                     "(pip install -e '.[deepspeed]'); the DeepSpeed-MoE import test needs it to "
                                     "build and save a DeepSpeed-MoE model")

SHAPE = dict(vocab=256, dim=16, n_heads=4, n_kv_heads=2, n_layers=3, first_k_dense=1, E=4, F=8, ffn_hidden=24)
MOETRAIN_NAMES = dict(embed="tok_embeddings", layers="layers", norm="norm", output="output", attn_norm="attn_norm",
                      attn="attn", ffn_norm="ffn_norm", ffn="ffn", w1="w1", w3="w3", w2="w2")
OTHER_NAMES = dict(embed="embed", layers="blocks", norm="final_norm", output="lm_head", attn_norm="ln1",
                   attn="attention", ffn_norm="ln2", ffn="mlp", w1="gate_proj", w3="up_proj", w2="down_proj")
OTHER_NAME_MAP = {"names": {"embed": "tok_embeddings", "blocks.{i}.ln1": "layers.{i}.attn_norm",
                            "blocks.{i}.attention": "layers.{i}.attn", "blocks.{i}.ln2": "layers.{i}.ffn_norm",
                            "blocks.{i}.mlp": "layers.{i}.ffn", "final_norm": "norm", "lm_head": "output"},
                  "expert": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
                  "ignore": ["steps_seen"]}


# ------------------------------------------------------------------------------------ the DeepSpeed-side model
def model_config():
    """moetrain's config of the attention the DeepSpeed model reuses (its defaults: rope theta, norm eps)."""
    from moetrain.config.schema import ModelConfig

    return ModelConfig(dim=SHAPE["dim"], n_heads=SHAPE["n_heads"], n_kv_heads=SHAPE["n_kv_heads"])


class Expert(nn.Module):
    """SwiGLU (three bias-free linears), or a GELU MLP (two) with gelu=True, under configurable names."""

    def __init__(self, dim, hidden, names, gelu=False):
        super().__init__()
        self.names, self.gelu = names, gelu
        setattr(self, names["w1"], nn.Linear(dim, hidden, bias=False))
        if not gelu:
            setattr(self, names["w3"], nn.Linear(dim, hidden, bias=False))
        setattr(self, names["w2"], nn.Linear(hidden, dim, bias=False))

    def forward(self, x):
        w1, w2 = getattr(self, self.names["w1"]), getattr(self, self.names["w2"])
        if self.gelu:
            return w2(F.gelu(w1(x)))
        return w2(F.silu(w1(x)) * getattr(self, self.names["w3"])(x))


class Block(nn.Module):
    def __init__(self, i, spec, names):
        from deepspeed.moe.layer import MoE

        from moetrain.model.attention import Attention
        from moetrain.model.mlp import SwiGLU
        from moetrain.model.norm import RMSNorm

        super().__init__()
        s, self.names = SHAPE, names
        self.is_moe = i >= s["first_k_dense"]
        setattr(self, names["attn_norm"], RMSNorm(s["dim"]))
        setattr(self, names["attn"], Attention(model_config()))
        setattr(self, names["ffn_norm"], RMSNorm(s["dim"]))
        if self.is_moe:
            ffn = MoE(s["dim"], Expert(s["dim"], s["F"], names, spec.get("gelu", False)), num_experts=s["E"],
                      ep_size=spec["ep"], k=spec["k"], capacity_factor=spec["capacity_factor"],
                      eval_capacity_factor=spec["capacity_factor"], min_capacity=0,
                      drop_tokens=spec["drop_tokens"], top2_2nd_expert_sampling=False)
        else:
            ffn = SwiGLU(s["dim"], s["ffn_hidden"])
        setattr(self, names["ffn"], ffn)

    def forward(self, x, cos, sin):
        n = self.names
        x = x + getattr(self, n["attn"])(getattr(self, n["attn_norm"])(x), cos, sin)
        y = getattr(self, n["ffn"])(getattr(self, n["ffn_norm"])(x))
        return x + (y[0] if self.is_moe else y)  # DeepSpeed's MoE returns (output, l_aux, exp_counts)


class DeepSpeedLM(nn.Module):
    """The moetrain transformer's computation written as a DeepSpeed user would, with deepspeed.moe.layer.MoE."""

    def __init__(self, spec, names):
        from moetrain.model.norm import RMSNorm

        super().__init__()
        s, self.names = SHAPE, names
        setattr(self, names["embed"], nn.Embedding(s["vocab"], s["dim"]))
        setattr(self, names["layers"], nn.ModuleList(Block(i, spec, names) for i in range(s["n_layers"])))
        setattr(self, names["norm"], RMSNorm(s["dim"]))
        setattr(self, names["output"], nn.Linear(s["dim"], s["vocab"], bias=False))
        if names is OTHER_NAMES:  # a buffer moetrain has no place for: left out through the name map's `ignore`
            self.register_buffer("steps_seen", torch.zeros(()))

    def forward(self, tokens):
        from moetrain.model.rope import rope_tables

        n = self.names
        cos, sin = rope_tables(model_config(), tokens.shape[1])
        h = getattr(self, n["embed"])(tokens)
        for block in getattr(self, n["layers"]):
            h = block(h, cos, sin)
        return getattr(self, n["output"])(getattr(self, n["norm"])(h)).float()


def save_deepspeed(rank, world, jobs):
    """For each (spec, names, out_dir) of `jobs`: build the model, train one step and save it through the DeepSpeed
    engine; return this rank's eval tokens, logits and MoE layer outputs of each."""
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    import sys

    import deepspeed

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (~50 s); gloo needs none.
    ds_torch_backend = sys.modules.get("deepspeed.comm.torch")
    if hasattr(ds_torch_backend, "build_shm_op"):
        ds_torch_backend.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    return [save_one(deepspeed, rank, *job) for job in jobs]


def save_one(deepspeed, rank, spec, names, out_dir):
    torch.manual_seed(0)
    model = DeepSpeedLM(spec, names)
    with torch.no_grad():  # DeepSpeed deep-copies one expert: give each (layer, global expert) its own weights
        for L, moe in enumerate(m for m in model.modules() if type(m).__name__ == "MoE"):
            for j, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                g = torch.Generator().manual_seed(100 * L + rank * moe.num_local_experts + j)
                for p in expert.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}})
    g = torch.Generator().manual_seed(10 + rank)
    tokens = torch.randint(0, SHAPE["vocab"], (2, 6), generator=g)
    loss = F.cross_entropy(engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    engine.backward(loss)
    engine.step()

    engine.eval()
    outs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out[0].detach().clone()))
             for m in model.modules() if type(m).__name__ == "MoE"]
    eval_tokens = torch.randint(0, SHAPE["vocab"], (2, 6), generator=g)
    with torch.no_grad():
        logits = engine(eval_tokens)
    for h in hooks:
        h.remove()
    # The allow-listed non-tensor objects (read as inert placeholders): Megatron-DeepSpeed's `args`, and the loss
    # scaler that fp16 training keeps in the optimizer state (placed in the client state here: fp16 needs a GPU).
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    engine.save_checkpoint(out_dir, client_state={"args": argparse.Namespace(lr=1e-2), "loss_scaler": scaler})
    return {"tokens": eval_tokens, "logits": logits, "moe_outs": outs}


def moetrain_forward(run_dir: Path, tokens):
    cfg, model = load_run_model(run_dir)
    outs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out[0] if isinstance(out, tuple) else out))
             for m in model.modules() if isinstance(m, MoELayer)]
    with torch.no_grad():
        logits = model(tokens)
    for h in hooks:
        h.remove()
    return cfg, logits, outs


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """The saved DeepSpeed checkpoints and what each rank's DeepSpeed model computed, all from one 2-rank launch:
    `top2` (ep_size=1, i.e. 2 data-parallel copies of every expert; moetrain's names; dropless), `top1_ep2`
    (ep_size=2: each rank holds half the experts; other names; capacity factor 4), `gelu` (GELU experts)."""
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    root = tmp_path_factory.mktemp("deepspeed")
    specs = {"top2": (dict(ep=1, k=2, drop_tokens=False, capacity_factor=1.0), MOETRAIN_NAMES),
             "top1_ep2": (dict(ep=2, k=1, drop_tokens=True, capacity_factor=4.0), OTHER_NAMES),
             "gelu": (dict(ep=1, k=1, drop_tokens=False, capacity_factor=1.0, gelu=True), MOETRAIN_NAMES)}
    jobs = [(spec, names, str(root / name)) for name, (spec, names) in specs.items()]
    per_rank = run_distributed(save_deepspeed, 2, jobs)
    result = {name: (root / name, [r[j] for r in per_rank]) for j, name in enumerate(specs)}
    name_map = root / "names.json"
    name_map.write_text(json.dumps(OTHER_NAME_MAP))
    result["name_map"] = name_map
    return result


OK = ["deepspeed.k=2", "deepspeed.drop_tokens=false", "model.n_heads=4"]


def assert_matches(run_dir: Path, ranks: list[dict]):
    for r in ranks:
        cfg, logits, outs = moetrain_forward(run_dir, r["tokens"])
        assert len(outs) == len(r["moe_outs"]) == SHAPE["n_layers"] - SHAPE["first_k_dense"]
        for ours, theirs in zip(outs, r["moe_outs"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, r["logits"], rtol=1e-5, atol=1e-5)
    return cfg


@needs_deepspeed
def test_top2_ep1_matches_deepspeed(ds, tmp_path):
    src, ranks = ds["top2"]
    run = import_deepspeed(src, tmp_path / "run", OK)
    assert (run / "config.yaml").is_file()
    cfg = assert_matches(run, ranks)
    r, m = cfg.router, cfg.model
    assert (r.top_k, r.norm_topk_prob, r.capacity_factor, r.score_func) == (2, True, None, "softmax")
    assert (m.n_layers, m.first_k_dense, m.num_experts, m.moe_hidden, m.n_kv_heads, m.ffn_hidden) == (3, 1, 4, 8, 2, 24)


@needs_deepspeed
def test_top1_ep2_renamed_matches_deepspeed(ds, tmp_path):
    src, ranks = ds["top1_ep2"]
    assert len(list((src / "global_step1").glob("layer_*_expert_*_model_states.pt"))) == 2 * SHAPE["E"]
    run = import_deepspeed(src / "global_step1", tmp_path / "run",
                           ["deepspeed.k=1", "deepspeed.capacity_factor=4", f"deepspeed.names={ds['name_map']}",
                            "model.n_heads=4"])
    cfg = assert_matches(run, ranks)  # each rank's tokens: DeepSpeed routed them with the experts split over 2 ranks
    assert (cfg.router.top_k, cfg.router.norm_topk_prob, cfg.router.capacity_factor) == (1, False, 4.0)


@needs_deepspeed
def test_moetrain_convert_command(ds, tmp_path, capsys):
    """The console tool recognises the DeepSpeed directory (--from auto), writes the run, and reports a problem as
    one `moetrain-convert: error:` line with exit status 2."""
    from moetrain.interop.cli import main

    src, ranks = ds["top2"]
    assert main([str(src), "--out", str(tmp_path / "run"), *OK]) == 0
    assert_matches(tmp_path / "run", ranks[:1])
    assert main([str(src), "--from", "deepspeed", "--out", str(tmp_path / "bad"), "model.n_heads=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetrain-convert: error: ") and "deepspeed.k=2" in err and "\n" not in err, err
    assert not (tmp_path / "bad").exists()


def refused(src, out: Path, overrides, *fragments):
    with pytest.raises(ConvertError) as e:
        import_deepspeed(src, out, overrides)
    message = str(e.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not out.exists()


@needs_deepspeed
def test_missing_expert_file_refused(ds, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(ds["top2"][0], src)
    (src / "global_step1" / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    refused(src, tmp_path / "run", OK, "layer_1_expert_2_mp_rank_00_model_states.pt is missing")


@needs_deepspeed
def test_gelu_expert_refused(ds, tmp_path):
    refused(ds["gelu"][0], tmp_path / "run", ["deepspeed.k=1", "model.n_heads=4"], "2-linear MLP expert", "SwiGLU")


@needs_deepspeed
def test_missing_settings_refused(ds, tmp_path):
    src = ds["top2"][0]
    refused(src, tmp_path / "run", ["model.n_heads=4"], "deepspeed.k=2")
    refused(src, tmp_path / "run", ["deepspeed.k=2"], "model.n_heads=H")
    refused(src, tmp_path / "run", OK + ["deepspeed.topk=2"], "unknown DeepSpeed option")
    refused(src, tmp_path / "run", ["deepspeed.k=2", "model.n_heads=4"] + ["model.num_shared_experts=1"],
            "no counterpart")


def test_not_a_deepspeed_checkpoint_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    refused(tmp_path, tmp_path / "run", OK, "is not a DeepSpeed checkpoint")
    refused(tmp_path / "nowhere", tmp_path / "run", OK, "is not a directory")


class RunsCode:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickle_that_runs_code_refused(tmp_path):
    src, marker = tmp_path / "ckpt", tmp_path / "executed"
    (src / "global_step1").mkdir(parents=True)
    (src / "latest").write_text("global_step1")
    torch.save({"module": {"w": torch.zeros(1)}, "client": RunsCode(marker)},
               src / "global_step1" / "mp_rank_00_model_states.pt")
    refused(src, tmp_path / "run", OK, "pathlib", "nothing was executed")
    assert not marker.exists()
