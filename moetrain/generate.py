"""moetrain-generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--greedy] [--seed S]
                  [--step N] [--tokenizer SPEC] [--device auto|cpu|cuda]

Continues a prompt with a trained, imported or upcycled model and prints the prompt and its continuation.

Legend: B batch (one prompt: 1), P prompt tokens, V vocabulary.

The prompt is encoded with the run's tokenizer (its config's data.tokenizer, bytes by default; --tokenizer replaces
it) and run through the model once, filling a KV cache (moetrain/model/kv_cache.py); then each new token is one
forward of one token at the next position. The next token is drawn from the last position's logits:
    greedy (--greedy, or --temperature 0)   argmax_v logits_v (the lowest id among equal maxima)
    sampled                                  p = softmax(logits / T); with top-p (nucleus) sampling, only the
                                             smallest set of most probable tokens whose probabilities sum to >= P is
                                             kept (the most probable always is) and renormalised; one draw from a
                                             torch.Generator seeded with --seed, so a seed reproduces the text.
Generation stops after N new tokens or at the tokenizer's end-of-sequence token (the byte tokenizer's: NUL, the
document separator of its shards), which is not printed. The model runs in eval mode (MoE routing token by token).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from moetrain.data import DataError


class GenerateError(ValueError):
    """A generation request the user can fix (empty prompt, too many tokens, bad sampling setting)."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with probability mass >= top_p
    greedy: bool = False
    seed: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerateError(f"--temperature {self.temperature} must be >= 0 and finite (0 is greedy)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise GenerateError(f"--top-p {self.top_p} must be in (0, 1] (1 keeps every token)")
        if not 0 <= self.seed < 2**63:
            raise GenerateError(f"--seed {self.seed} must be in [0, 2^63)")


def next_token(logits_BV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row (B,) from its logits, as the module docstring says."""
    if sampling.is_greedy:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_BV, order_BV = torch.sort(probs_BV, dim=-1, descending=True, stable=True)
        mass_before_BV = torch.cumsum(sorted_BV, dim=-1) - sorted_BV  # probability of the more probable tokens
        sorted_BV = sorted_BV.masked_fill(mass_before_BV >= sampling.top_p, 0.0)  # the first is always kept
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt_ids: Sequence[int], sampling: SamplingConfig,
                 eos_id: Optional[int] = None, vocab_size: Optional[int] = None) -> list[int]:
    """The new token ids after `prompt_ids` (at most sampling.max_new_tokens, ending at `eos_id` when drawn, which
    is included), decoded with a KV cache. `vocab_size`: only ids below it are drawn (the tokenizer's vocabulary,
    when the model's embedding is padded beyond it). `model` is a TransformerLM; it is put in eval mode."""
    from moetrain.model.kv_cache import KVCache

    sampling.check()
    cfg = model.cfg
    if len(prompt_ids) == 0:
        raise GenerateError("the prompt is empty; give at least one token of text")
    total = len(prompt_ids) + sampling.max_new_tokens
    if total > cfg.max_seq_len:
        raise GenerateError(f"the prompt's {len(prompt_ids)} tokens + --max-new-tokens {sampling.max_new_tokens} = "
                            f"{total} exceed model.max_seq_len={cfg.max_seq_len}; shorten the prompt or lower "
                            f"--max-new-tokens")
    model.eval()
    weight = model.tok_embeddings.weight
    device = weight.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = KVCache.create(cfg, 1, total, device, weight.dtype)
    tokens_BS = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
    new: list[int] = []
    for _ in range(sampling.max_new_tokens):
        logits_BV = model(tokens_BS, cache=cache)[:, -1, :vocab_size]
        tokens_BS = next_token(logits_BV, sampling, generator).view(1, 1)
        new.append(int(tokens_BS))
        if new[-1] == eos_id:
            break
    return new


def generate_text(run_dir: str, prompt: str, sampling: SamplingConfig, step: Optional[int] = None,
                  tokenizer_spec: Optional[str] = None, device: str = "cpu") -> tuple[str, list[int]]:
    """(the continuation of `prompt` as text, its token ids) from the model of a run directory (or a checkpoint
    directory inside one); the tokenizer is the run's data.tokenizer unless `tokenizer_spec` is given."""
    from moetrain.data.tokenizer import load_tokenizer
    from moetrain.interop.run_dir import load_run_model

    sampling.check()
    if not prompt:
        raise GenerateError("--prompt is empty; give some text to continue")
    cfg, model = load_run_model(Path(run_dir), step=step, device=device)
    spec = tokenizer_spec or cfg.data.tokenizer
    try:
        tokenizer = load_tokenizer(spec, option="--tokenizer" if tokenizer_spec else "the run's data.tokenizer")
    except DataError as e:
        if tokenizer_spec:
            raise
        raise GenerateError(f"{e} (or pass --tokenizer SPEC)") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise GenerateError(f"the tokenizer {spec} has {tokenizer.vocab_size} ids but the model's vocabulary is "
                            f"model.vocab_size={cfg.model.vocab_size}; give the tokenizer the model was trained with")
    prompt_ids = [int(i) for i in tokenizer.encode(prompt, add_special_tokens=True)]
    if not prompt_ids:
        raise GenerateError("--prompt encodes to no tokens; give some text to continue")
    new = generate_ids(model, prompt_ids, sampling, tokenizer.eos_id, tokenizer.vocab_size)
    shown = new[:-1] if new and new[-1] == tokenizer.eos_id else new
    # Decoding the whole sequence keeps what a tokenizer only renders in context (e.g. sentencepiece's leading space).
    before, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + shown)
    return (full[len(before):] if full.startswith(before) else tokenizer.decode(shown)), new


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda but no CUDA device is visible; use --device cpu")
    return name


def main(argv: Optional[Sequence[str]] = None) -> int:
    from moetrain.interop import ConvertError
    from moetrain.train.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="moetrain-generate", description=__doc__.splitlines()[3])
    parser.add_argument("run_dir", help="a run directory (newest valid checkpoint) or a checkpoint directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=SamplingConfig.temperature, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=SamplingConfig.top_p, help="nucleus sampling mass, (0, 1]")
    parser.add_argument("--greedy", action="store_true", help="always take the most probable token")
    parser.add_argument("--seed", type=int, default=SamplingConfig.seed)
    parser.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: newest)")
    parser.add_argument("--tokenizer", default=None, help="bytes or a tokenizer path (default: the run's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.greedy, args.seed)
    try:
        device = _device(args.device)
        if not Path(args.run_dir).is_dir():
            raise GenerateError(f"{args.run_dir} is not a directory; give a run directory written by moetrain-train "
                                f"or moetrain-convert")
        text, _ = generate_text(args.run_dir, args.prompt, sampling, args.step, args.tokenizer, device)
    except (GenerateError, DataError, ConvertError, CheckpointError) as e:
        print(f"moetrain-generate: error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
