"""Expert compression on a model trained here: validation loss and expert-weight memory at 100%, 75% and 50% of the
experts kept, for every method of moetrain-compress plus random pruning, without and with a short fine-tune.

    python bench/compress.py [--cache runs/compress_reference] [--finetune-steps 100] [--work DIR]
                             [--write docs/compression.md]

1. The reference model (REFERENCE below: the tiny preset made 64 wide with 16 experts of hidden size 64 per MoE layer,
   2 MoE layers, top-2, trained REFERENCE_STEPS steps on the embedded corpus) is trained once with moetrain-train into
   --cache and reused while that directory holds its final checkpoint (delete it to retrain).
2. One calibration pass (8192 training-split tokens, seed 0) gives the statistics every method uses.
3. For each method and keep ratio: compress (moetrain.compress.writer.compress_model), the validation loss of the
   compressed model on the trainer's validation windows (trainer.eval_batches=8 global batches of the run), then write
   the run directory and fine-tune it with moetrain-train (-cd OUT -cn config, trainer.max_steps=--finetune-steps,
   optim.lr=1e-3, 10 warm-up steps), whose final evaluation uses the same windows. The uncompressed model gets the
   same fine-tune, so the fine-tuned rows compare with the same extra training.
Expert memory: the routed experts' fp32 weights (w1, w3, w2 of every expert of every MoE layer).
With --write the table replaces the one between the markers in docs/compression.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moetrain.cli import train_main
from moetrain.compress.calibration import calibrate
from moetrain.compress.cli import calibration_batches
from moetrain.compress.writer import compress_model, experts_per_moe_layer, write_compressed
from moetrain.data.loader import build_loader
from moetrain.interop.run_dir import load_run_model
from moetrain.train import checkpoint as ckpt

REFERENCE_STEPS = 1500
REFERENCE = ["model=tiny", "model.num_experts=16", "model.moe_hidden=64", "model.dim=64", "model.n_layers=3",
             "model.ffn_hidden=256", "data.seq_len=64", "data.micro_batch_size=16",
             f"trainer.max_steps={REFERENCE_STEPS}", "trainer.log_every=50", "trainer.eval_every=0",
             "trainer.checkpoint_every=100", "trainer.progress=false"]
METHODS = ["random", "frequency", "reconstruction", "merge", "dern"]
KEEPS = [0.75, 0.5]
CALIBRATION_TOKENS = 8192
START, END = "<!-- bench/compress.py table: start -->", "<!-- bench/compress.py table: end -->"


def reference(cache: Path) -> Path:
    final = cache / "checkpoints" / ckpt.checkpoint_dir_name(REFERENCE_STEPS)
    if not (final / ckpt.COMPLETE_FILE).is_file():
        print(f"training the reference model into {cache} ({REFERENCE_STEPS} steps)", flush=True)
        cmd = ["moetrain-train", *REFERENCE, f"trainer.run_dir={cache}"]
        subprocess.run(cmd, check=True)
    return cache


@torch.no_grad()
def val_loss(cfg, model) -> float:
    """Mean cross-entropy over the trainer's validation windows (the same ones its final evaluation reads)."""
    loader = build_loader(cfg.data, cfg.trainer.seed, 0, 1)
    total, n = 0.0, 0
    for inputs_BS, targets_BS in loader.val_batches(cfg.trainer.eval_batches):
        logits = model(inputs_BS)
        total += F.cross_entropy(logits.flatten(0, 1), targets_BS.flatten()).item()
        n += 1
    return total / n


def finetune(run: Path, steps: int) -> float:
    """Fine-tune the run directory in this process; its final validation loss."""
    args = ["-cd", str(run), "-cn", "config", f"trainer.max_steps={steps}", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", f"trainer.log_every={steps}", "optim.lr=1e-3", "optim.warmup_steps=10",
            "trainer.progress=false", "logger.console=false"]
    if train_main(args) != 0:
        raise RuntimeError(f"fine-tuning {run} failed")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("runs/compress_reference"))
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--work", type=Path, default=None, help="where the compressed runs go (default: a temporary dir)")
    p.add_argument("--write", type=Path, default=None, help="replace the table in this markdown file")
    args = p.parse_args()
    t0 = time.time()
    run = reference(args.cache)
    cfg, model = load_run_model(run)
    experts = experts_per_moe_layer(cfg)
    batches = list(calibration_batches(cfg.data, CALIBRATION_TOKENS, seed=0))
    stats = calibrate(model, batches, max_inputs=4096)
    work = args.work or Path(tempfile.mkdtemp(prefix="moetrain-compress-bench-"))
    rows = []

    def measure(label: str, method: str, keep: float) -> None:
        counts = [max(1, math.floor(keep * E + 0.5)) for E in experts]
        c = compress_model(cfg, model, stats, method, counts, seed=0)
        loss = val_loss(c.cfg, c.model)
        out = work / f"{method}_{int(keep * 100)}"
        write_compressed(out, c, str(run))
        tuned = finetune(out, args.finetune_steps) if args.finetune_steps else float("nan")
        rows.append({"method": label, "keep": keep, "experts": counts, "expert_mib": c.report["expert_bytes_after"]
                     / 2**20, "val_loss": loss, "val_loss_finetuned": tuned})
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)

    measure("none (all experts)", "frequency", 1.0)
    for keep in KEEPS:
        for method in METHODS:
            measure(method, method, keep)
    table = format_table(rows, args.finetune_steps)
    print(table)
    print(f"total {time.time() - t0:.0f} s", flush=True)
    if args.write:
        text = args.write.read_text()
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        args.write.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return 0


def format_table(rows: list[dict], steps: int) -> str:
    lines = [f"| experts kept | method | experts per MoE layer | expert weights (MiB, fp32) | val loss | "
             f"val loss after {steps} fine-tune steps |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {int(r['keep'] * 100)}% | {r['method']} | {r['experts']} | {r['expert_mib']:.3f} | "
                     f"{r['val_loss']:.4f} | {r['val_loss_finetuned']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
