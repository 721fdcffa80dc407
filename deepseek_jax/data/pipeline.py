"""The grain pipeline: documents -> tokens + eos -> packed rows -> batches.

Training stream (all grain transformations, state = grain iterator state):

  MapDataset(documents).shuffle(seed_docs).repeat(num_epochs)  # new order each epoch
    .map(tokenize_document)                                    # tokens [T+1] ending in eos
    .to_iter_dataset()
  ConcatThenSplitIterDataset(seq_len)   # grain's packer: concatenate, cut every L tokens
  WindowShuffleIterDataset(shuffle_rows, seed_rows)            # mix rows of long documents
    .map(finish_row).batch(B)                                  # global batch
    [.mp_prefetch(num_workers)] .map(take this process's rows) [ThreadPrefetch(prefetch)]

Packing choices: rows are exactly L tokens with no padding except at the very
end of a finite stream (training with num_epochs=None never pads; packing runs
across epoch boundaries). A document longer than the room left in a row is
split and continues at the start of the next row with `positions` restarting at
0: the model never attends across rows, so positions >= L would never be seen
in training. Segment ids are 1-based per row, so a continued document gets
segment 1 in its next row; the loss mask (segment_ids[i] == segment_ids[i+1] != 0)
never predicts across a document or row boundary.

Sharding: every process builds the same global stream and keeps rows
[shard_index * B/n, (shard_index + 1) * B/n) of each global batch. The data is
thus independent of the process count (a run can resume on another number of
hosts with the same state), at the cost of each process tokenising the whole
stream, which is cheap for byte-level data; for slow tokenizers use num_workers.

Each batch is a dict of numpy arrays (b = B / shard_count):
  tokens       int32 [b, L]  token ids; pad_id where segment_ids == 0
  segment_ids  int32 [b, L]  1-based document index within the row, 0 = padding
  positions    int32 [b, L]  position within the document's piece in this row
  num_bytes    int32 [b]     raw UTF-8 bytes the row's tokens stand for (for
                             bits per byte). Per document exact; within a
                             document bytes are spread evenly over its tokens
                             (exactly 1 per token for the byte tokenizer, 0 for eos).
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from deepseek_jax.data import config as config_lib
from deepseek_jax.data import sources, tokenizers

Batch = dict[str, np.ndarray]


def tokenize_document(text: bytes, tokenizer: tokenizers.Tokenizer) -> dict[str, np.ndarray]:
    """Returns {'tokens': int32 [T+1] ending in eos, 'token_bytes': int32 [T+1]}.

    token_bytes spreads len(text) over the T text tokens (sum is exact; eos gets 0).
    """
    ids = tokenizer.encode(text)
    n = len(ids)
    tokens = np.empty(n + 1, dtype=np.int32)
    tokens[:n] = ids
    tokens[n] = tokenizer.eos_id
    token_bytes = np.zeros(n + 1, dtype=np.int32)
    if n:
        token_bytes[:n] = np.diff(np.arange(n + 1, dtype=np.int64) * len(text) // n)
    else:  # a text the tokenizer maps to nothing still counts its bytes
        token_bytes[0] = len(text)
    return {"tokens": tokens, "token_bytes": token_bytes}


def finish_row(packed: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Packer output -> {tokens, segment_ids, positions: int32 [L], num_bytes: int32 []}."""
    segment_ids = packed["tokens_segment_ids"].astype(np.int32)
    return {
        "tokens": np.where(segment_ids > 0, packed["tokens"], pad_id).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["tokens_positions"].astype(np.int32),
        "num_bytes": np.int32(packed["token_bytes"].sum()),
    }


def stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int, pad_id: int) -> Batch:
    """Stacks rows into a batch of batch_size, adding all-padding rows at the stream's end."""
    seq_len = len(rows[0]["tokens"])
    pad_row = {
        "tokens": np.full(seq_len, pad_id, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "num_bytes": np.int32(0),
    }
    rows = list(rows) + [pad_row] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in pad_row}


def take_shard(batch: Batch, shard_index: int, shard_count: int) -> Batch:
    """This process's contiguous block of rows of a global batch: [B, ...] -> [B/n, ...]."""
    size = len(batch["tokens"]) // shard_count
    return {k: v[shard_index * size : (shard_index + 1) * size] for k, v in batch.items()}


class DataIterator(grain.DatasetIterator):
    """The pipeline's iterator: yields batches; get_state() is plain JSON data.

    Works with grain's orbax `grain.checkpoint.CheckpointHandler` (it is a
    `grain.DatasetIterator`) or with json.dumps/loads of get_state().
    """

    def __init__(self, parent: grain.DatasetIterator):
        # The pipeline is held in a box rather than as a grain parent so that
        # closing can also release it: grain 0.2.18's ThreadPrefetch iterator is
        # closed again by its own __del__, which fails if that runs during
        # interpreter teardown. Closing and releasing at exit (or when this
        # iterator goes away) lets that second close run while modules are intact.
        super().__init__()
        self._box = [parent]
        self._finalizer = weakref.finalize(self, _close_and_release, self._box)

    @property
    def _pipeline(self) -> grain.DatasetIterator:
        if not self._box:
            raise ValueError("DataIterator: the iterator was closed.")
        return self._box[0]

    def close(self) -> None:
        """Stops prefetch threads/worker processes; the iterator cannot be used after."""
        self._finalizer()
        super().close()

    def start_prefetch(self) -> None:
        self._pipeline.start_prefetch()

    def __next__(self) -> Batch:
        return next(self._pipeline)

    def get_state(self) -> dict[str, Any]:
        # Normalise to JSON types now, so a state behaves the same whether or
        # not it went through a file.
        return json.loads(json.dumps(self._pipeline.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        self._pipeline.set_state(_restore_remainder_slices(state))


def _close_and_release(box: list) -> None:
    if box:
        box.pop().close()


def _restore_remainder_slices(state: Any) -> Any:
    # grain 0.2.18's ConcatThenSplit compares its `remainder_slices` with the
    # tuple (-1, -1); after JSON they are lists, the comparison fails and a
    # restored iterator silently drops a document. Turn them back into tuples.
    if isinstance(state, dict):
        return {
            k: (
                {f: tuple(s) for f, s in v.items()}
                if k == "remainder_slices" and isinstance(v, dict)
                else _restore_remainder_slices(v)
            )
            for k, v in state.items()
        }
    if isinstance(state, list):
        return [_restore_remainder_slices(s) for s in state]
    return state


def _seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit seeds for the document shuffle and the row shuffle."""
    doc_seed, row_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(doc_seed), int(row_seed)


def build_dataset(
    documents: Sequence[bytes],
    tokenizer: tokenizers.Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    seed: int | None = 0,
    num_epochs: int | None = None,
    shuffle_rows: int = 0,
    prefetch: int = 0,
    num_workers: int = 0,
) -> grain.IterDataset:
    """The batched grain dataset over `documents` (see the module docstring).

    seed=None: no shuffling at all (documents in order, one pass if num_epochs=1)
    — the evaluation stream. Yields dicts of [batch_size / shard_count, ...] arrays.
    """
    if not documents:
        raise ValueError("build_dataset: no documents.")
    ds = grain.MapDataset.source(documents)
    if seed is not None:
        doc_seed, row_seed = _seeds(seed)
        ds = ds.shuffle(seed=doc_seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(functools.partial(tokenize_document, tokenizer=tokenizer))
    # Documents are in memory and tokenising is cheap: reader threads would only
    # contend for the GIL (grain's own advice for in-memory data).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it = grain.experimental.ConcatThenSplitIterDataset(
        it, length_struct={"tokens": seq_len, "token_bytes": seq_len}
    )
    if seed is not None and shuffle_rows > 1:
        it = grain.experimental.WindowShuffleIterDataset(
            it, window_size=shuffle_rows, seed=row_seed
        )
    it = it.map(functools.partial(finish_row, pad_id=tokenizer.pad_id))
    it = it.batch(
        batch_size,
        batch_fn=functools.partial(stack_rows, batch_size=batch_size, pad_id=tokenizer.pad_id),
    )
    if num_workers:
        # grain's worker processes read its absl flags; in a program that never
        # parsed flags (a notebook, pytest) that would raise, so use the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    if shard_count > 1:
        it = it.map(functools.partial(take_shard, shard_index=shard_index, shard_count=shard_count))
    if prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


def load_corpus(data_cfg: ml_collections.ConfigDict) -> sources.Corpus:
    """Reads and splits the documents named by `data_cfg` (see sources.py)."""
    return sources.load_corpus(
        data_cfg.source,
        path=data_cfg.path,
        eval_path=data_cfg.eval_path,
        text_field=data_cfg.text_field,
        validation_fraction=data_cfg.validation_fraction,
    )


def _checked_corpus(data_cfg: ml_collections.ConfigDict, shard_index: int, shard_count: int,
                    corpus: sources.Corpus | None) -> sources.Corpus:
    """Validates the data config and this process's shard; loads the corpus unless given."""
    config_lib.validate_data_config(data_cfg)
    config_lib.validate_sharding(data_cfg, shard_index, shard_count)
    return corpus or load_corpus(data_cfg)


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    corpus: sources.Corpus | None = None,
    tokenizer: tokenizers.Tokenizer | None = None,
) -> DataIterator:
    """The training iterator: shuffled, packed, repeated; batches of [B/shard_count, L].

    Pass `corpus`/`tokenizer` to reuse ones already loaded (e.g. for eval too).
    Infinite unless data.num_epochs is set. Restore with `set_state`.
    """
    corpus = _checked_corpus(data_cfg, shard_index, shard_count, corpus)
    if not corpus.train:
        raise ValueError(
            f"data: the training split is empty ({len(corpus.validation)} validation documents); "
            "lower data.validation_fraction or add data."
        )
    ds = build_dataset(
        corpus.train,
        tokenizer or tokenizers.make_tokenizer(data_cfg),
        seq_len=data_cfg.seq_len,
        batch_size=data_cfg.batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        seed=data_cfg.seed,
        num_epochs=data_cfg.num_epochs,
        shuffle_rows=data_cfg.shuffle_rows,
        prefetch=data_cfg.prefetch,
        num_workers=data_cfg.num_workers,
    )
    return DataIterator(iter(ds))


def make_eval_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    corpus: sources.Corpus | None = None,
    tokenizer: tokenizers.Tokenizer | None = None,
) -> DataIterator:
    """One deterministic pass over the validation split, in source order.

    Same batch format as training; the last batch is padded (rows with
    segment_ids == 0 and num_bytes == 0), so every process gets the same number
    of batches and every validation token is seen exactly once.
    Bits per byte = sum(masked token NLL) / ln(2) / sum(num_bytes).
    """
    corpus = _checked_corpus(data_cfg, shard_index, shard_count, corpus)
    if not corpus.validation:
        raise ValueError(
            f"data: the validation split is empty ({len(corpus.train)} training documents, "
            f"validation_fraction={data_cfg.validation_fraction}); raise data.validation_fraction "
            "or set data.eval_path."
        )
    ds = build_dataset(
        corpus.validation,
        tokenizer or tokenizers.make_tokenizer(data_cfg),
        seq_len=data_cfg.seq_len,
        batch_size=data_cfg.batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        seed=None,
        num_epochs=1,
        prefetch=data_cfg.prefetch,
    )
    return DataIterator(iter(ds))
