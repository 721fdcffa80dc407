"""data: tokenizers, document sources (stdlib corpus, txt/jsonl/parquet) and the grain pipeline.

    cfg = default_data_config()            # config.data; see config.py for every key
    train = make_train_iterator(cfg, shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(train)   # tokens/segment_ids/positions int32 [B/n, L], num_bytes int32 [B/n]
    state = train.get_state()              # JSON data; train.set_state(state) resumes exactly
"""

from deepseek_jax.data.config import default_data_config, validate_data_config
from deepseek_jax.data.pipeline import (
    DataIterator,
    load_corpus,
    make_eval_iterator,
    make_train_iterator,
)
from deepseek_jax.data.sources import Corpus, SourceStats
from deepseek_jax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "DataIterator",
    "HFTokenizer",
    "SourceStats",
    "Tokenizer",
    "default_data_config",
    "load_corpus",
    "make_eval_iterator",
    "make_tokenizer",
    "make_train_iterator",
    "validate_data_config",
]
