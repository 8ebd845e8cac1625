"""AdamW optimizer-step time, torch fused vs foreach (and optionally the per-tensor loop), on the parameters of the
default model (`compose_config([])` -> TransformerLM), interleaved in one process.

    python bench/optimizer_step.py                      # fused vs foreach, 30 timed iterations after 5 warm-up
    python bench/optimizer_step.py --iters 50 --loop    # also the per-tensor loop; --threads N sets torch threads

Each implementation steps its own copy of the model (same initial weights, same fixed random gradients, the same
two param groups as training: `moetrain.train.optim.param_groups`). Every iteration times one `step()` of each,
alternating which goes first, so drift in machine load hits both alike. Prints per implementation the median and the
spread (min, 25th and 75th percentile, max) in ms, and the median of the per-iteration ratios to fused.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from moetrain.config.compose import compose_config
from moetrain.model.transformer import TransformerLM
from moetrain.train.optim import param_groups

IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--loop", action="store_true", help="also time the per-tensor (for-loop) implementation")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config([])
    torch.manual_seed(0)
    base = TransformerLM(cfg.model, cfg.router)
    grads = {name: torch.randn_like(p) * 1e-2 for name, p in base.named_parameters()}
    names = ["fused", "foreach"] + (["loop"] if args.loop else [])
    optimizers = {}
    for name in names:
        model = copy.deepcopy(base)
        for pname, p in model.named_parameters():
            p.grad = grads[pname].clone()
        o = cfg.optim
        optimizers[name] = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                             eps=o.eps, **IMPLS[name])
    n_params = sum(p.numel() for p in base.parameters())
    n_tensors = sum(1 for _ in base.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default model: {n_params:,} parameters in "
          f"{n_tensors} tensors; {args.warmup} warm-up + {args.iters} timed iterations, interleaved")
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                t0 = time.perf_counter()
                optimizers[name].step()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[name].append(dt)
    for name in names:
        ts = sorted(times[name])
        q = statistics.quantiles(ts, n=4)
        ratio = statistics.median(a / b for a, b in zip(times[name], times["fused"]))
        print(f"{name:8s} median {1e3 * statistics.median(ts):8.3f} ms   min {1e3 * ts[0]:8.3f}  p25 {1e3 * q[0]:8.3f}"
              f"  p75 {1e3 * q[2]:8.3f}  max {1e3 * ts[-1]:8.3f}   per-iteration ratio to fused (median) {ratio:.2f}x")


if __name__ == "__main__":
    main()
