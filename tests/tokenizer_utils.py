"""A small byte-level BPE tokenizer trained on the fly (nothing downloaded), for tests that need a real tokenizer."""

from pathlib import Path

EOS = "<|endoftext|>"


def train_bpe(out: Path, vocab_size: int = 400, num_files: int = 40) -> Path:
    """Train a byte-level BPE tokenizer with an `<|endoftext|>` special token on the first `num_files` files of the
    embedded stdlib corpus (a fraction of a second); save it as `out` (a tokenizer.json file) and return `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moetrain.data.corpus import stdlib_files

    texts = [f.read_text(encoding="utf-8", errors="ignore") for f in stdlib_files()[:num_files]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
