"""Data: byte tokenizer, the embedded default corpus, on-disk token shards, deterministic resumable sampling."""


class DataError(ValueError):
    """A data problem the user can fix (missing shards, batch sizes that do not divide, too little text)."""
