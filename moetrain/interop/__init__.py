"""Moving models in and out of moetrain: Hugging Face import/export (hf/), DeepSpeed-MoE checkpoints, dense-to-MoE
upcycling. Every converter writes an ordinary run directory (run_dir.py) that `moetrain-train` continues and
`moetrain-generate` samples from."""


class ConvertError(ValueError):
    """A conversion the user can fix (unsupported setting, missing file, shape mismatch): one line, nothing written."""
