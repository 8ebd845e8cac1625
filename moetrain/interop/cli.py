"""moetrain-convert: move models in and out of moetrain run directories (docs/interop.md).

    moetrain-convert SRC --out OUT [--from auto|hf|moetrain|deepspeed] [--to moetrain|hf] [--step N]
                     [--arch MODEL_TYPE] [--max-shard-size SIZE] [--dtype float32|bfloat16|float16]
                     [--upcycle --num-experts E [--split G] [--noise STD] [--seed S]] [OVERRIDE ...]

    hf -> moetrain          import a Hugging Face model directory (moetrain.interop.hf.import_hf)
    moetrain -> hf          export a run or checkpoint directory (--to hf; moetrain.interop.hf.export_hf)
    deepspeed -> moetrain   import a DeepSpeed-MoE checkpoint (moetrain.interop.deepspeed.import_deepspeed)
    --upcycle               a dense model (ours or Hugging Face) -> an MoE (moetrain.interop.upcycle.upcycle)
OVERRIDE are moetrain config overrides (Hydra syntax, e.g. parallel.ep=2) applied on top of the converted settings.
Under torchrun (`torchrun --nproc_per_node=2 -m moetrain.interop.cli SRC --out OUT parallel.ep=2`) an import builds
the model under that layout and each rank reads only the experts it holds. A problem the user can fix prints one line,
`moetrain-convert: error: ...`, exits with status 2, and leaves nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "moetrain-convert"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert models into and out of moetrain run directories.",
                                epilog="OVERRIDE: moetrain config overrides such as parallel.ep=2 (imports and "
                                       "upcycling). See docs/interop.md.")
    p.add_argument("src", help="a Hugging Face model directory, a moetrain run or checkpoint directory, or a "
                               "DeepSpeed checkpoint directory")
    p.add_argument("--out", required=True, help="the directory to write (must not hold a model or checkpoint)")
    p.add_argument("--from", dest="source", choices=("auto", "hf", "moetrain", "deepspeed"), default="auto",
                   help="what SRC is (default: recognised by its files)")
    p.add_argument("--to", dest="target", choices=("moetrain", "hf"), default="moetrain")
    p.add_argument("--step", type=int, default=None, help="export this step of a run (default: the newest valid)")
    p.add_argument("--arch", default=None, help="export: the Hugging Face model_type to write (default: the one the "
                                                "model's structure names, e.g. mixtral, qwen3_moe, deepseek_v3)")
    p.add_argument("--max-shard-size", default=None, help="export: largest safetensors shard (default 5GB); more "
                                                          "goes into several shards with an index")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="export: the weights' dtype (default float32: exact; bfloat16 halves the size)")
    p.add_argument("--upcycle", action="store_true", help="build an MoE from a dense model")
    p.add_argument("--num-experts", type=int, default=None, help="upcycling: routed experts per MoE layer")
    p.add_argument("--split", type=int, default=1, help="upcycling: split each FFN into this many fine experts")
    p.add_argument("--noise", type=float, default=0.0, help="upcycling: std of the noise added to each copy")
    p.add_argument("--seed", type=int, default=0, help="upcycling: seed of the noise and the router")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE")
    return p


def detect_source(src: Path) -> str:
    """hf (config.json), moetrain (config.yaml, or a checkpoint directory) or deepspeed (*model_states.pt)."""
    from moetrain.interop import ConvertError

    if not src.exists():
        raise ConvertError(f"{src} does not exist")
    if (src / "config.json").is_file():
        return "hf"
    if (src / "config.yaml").is_file() or (src / "COMPLETE").is_file():
        return "moetrain"
    if any(src.glob("*model_states.pt")) or any(src.glob("*/*model_states.pt")):
        return "deepspeed"
    raise ConvertError(f"cannot tell what {src} holds (no config.json, config.yaml or DeepSpeed model states); "
                       f"pass --from hf|moetrain|deepspeed")


def convert(args: argparse.Namespace) -> object:
    """Dispatch to the converter; returns what it wrote."""
    import torch.distributed as dist

    from moetrain.interop import ConvertError

    src, out = Path(args.src), Path(args.out)
    if args.upcycle:
        if args.num_experts is None:
            raise ConvertError("--upcycle needs --num-experts E (routed experts per MoE layer)")
        from moetrain.interop.upcycle import upcycle

        return upcycle(src, out, args.num_experts, split=args.split, noise_std=args.noise, seed=args.seed,
                       overrides=tuple(args.overrides))
    if args.num_experts is not None:
        raise ConvertError("--num-experts is an upcycling option; add --upcycle")
    source = detect_source(src) if args.source == "auto" else args.source
    if args.target == "hf":
        if source != "moetrain":
            raise ConvertError(f"--to hf exports a moetrain run; {src} is a {source} model")
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ConvertError("--to hf runs in one process (the checkpoint loads whole whatever layout saved it); "
                               "run it without torchrun")
        if args.overrides:
            raise ConvertError(f"an export takes no config overrides (got {args.overrides[0]}); the run's own "
                               f"config.yaml describes the model")
        from moetrain.interop.hf import export_hf

        kwargs = {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}
        return export_hf(src, out, step=args.step, arch=args.arch, dtype=args.dtype or "float32", **kwargs)
    for flag, value in (("--step", args.step), ("--arch", args.arch), ("--max-shard-size", args.max_shard_size),
                        ("--dtype", args.dtype)):
        if value is not None:
            raise ConvertError(f"{flag} is an export option (--to hf)")
    if source == "hf":
        from moetrain.interop.hf import import_hf

        return import_hf(src, out, tuple(args.overrides))
    if source == "deepspeed":
        from moetrain.interop.deepspeed import import_deepspeed

        return import_deepspeed(src, out, overrides=tuple(args.overrides))
    raise ConvertError(f"{src} already is a moetrain run; convert it with --to hf or --upcycle")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch.distributed as dist

    from moetrain.config.validate import ConfigError
    from moetrain.interop import ConvertError
    from moetrain.parallel.mesh import env_world
    from moetrain.train.checkpoint import CheckpointError

    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    rank, world_size, _ = env_world()
    started = False
    if world_size > 1 and not dist.is_initialized():  # under torchrun: conversions run on CPU with gloo
        dist.init_process_group("gloo")
        started = True
    try:
        written = convert(args)
    except (ConvertError, ConfigError, CheckpointError) as e:
        if rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    if rank == 0:
        shown = written[0].parent if isinstance(written, list) and written else written
        print(f"{PROG}: wrote {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
