"""Document sources: the Python standard library (no download) and local files.

A document is raw `bytes` (never decoded here, so byte-level tokenisation sees
the file exactly). Each source yields `(split_key, text)` pairs; the train /
validation split is a pure function of the key:

  validation  iff  blake2b(key) / 2**64 < validation_fraction

so it does not depend on file order, machine or process count.

- stdlib: every `*.py` under `sysconfig.get_paths()['stdlib']`, walked in sorted
  order, skipping `site-packages`, `dist-packages` and `__pycache__`. The test
  suite (`test/`, `*/tests/`, `idle_test/`) is *included*: it is ~60% of the
  ~30 MB and holds real non-UTF-8 files. One document per file; key = its
  POSIX-style relative path, so the split is identical on every machine with
  the same Python version, and a file keeps its split across patch releases.
- files (`data.path`, comma-separated paths or globs):
  `.txt` = one document per file; `.jsonl` = one per line, text in
  `data.text_field`; `.parquet` = one per row, same column. key = the
  document's content, so exact duplicates always land in the same split (no
  train/validation leakage) wherever the files live.

Bad data: a path or glob matching nothing raises ValueError naming it; empty
documents, empty files, jsonl lines with invalid JSON or without the field are
skipped and counted (the first few logged with file:line); no documents at all
raises ValueError.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence

from absl import logging

SUFFIXES = (".txt", ".jsonl", ".parquet")
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_MAX_LOGGED_PROBLEMS = 5  # per kind of problem


@dataclasses.dataclass
class SourceStats:
    """What was read, and what was skipped and why (counts)."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    non_utf8_documents: int = 0  # HF tokenizers see U+FFFD for their bad bytes
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, kind: str, where: str, why: str, *, warn: bool = True) -> None:
        """Counts a skipped item; logs the first few of each kind with their location."""
        self.skipped[kind] += 1
        if not warn:
            return
        if self.skipped[kind] <= _MAX_LOGGED_PROBLEMS:
            logging.warning("data: skipping %s (%s): %s", where, kind, why)
        elif self.skipped[kind] == _MAX_LOGGED_PROBLEMS + 1:
            logging.warning("data: further '%s' skips are counted but not logged", kind)

    def add(self, text: bytes) -> None:
        self.documents += 1
        self.bytes += len(text)
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            self.non_utf8_documents += 1


@dataclasses.dataclass
class Corpus:
    """Documents of both splits (raw bytes, in source order) and the read stats."""

    train: list[bytes]
    validation: list[bytes]
    stats: SourceStats


def is_validation(key: str | bytes, validation_fraction: float) -> bool:
    """The deterministic split rule (see the module docstring)."""
    if validation_fraction <= 0.0:
        return False
    data = key.encode("utf-8") if isinstance(key, str) else key
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < validation_fraction


def split(
    documents: Iterator[tuple[str | bytes, bytes]], validation_fraction: float
) -> tuple[list[bytes], list[bytes]]:
    """Splits (key, text) pairs into (train texts, validation texts), order kept."""
    train, validation = [], []
    for key, text in documents:
        (validation if is_validation(key, validation_fraction) else train).append(text)
    return train, validation


# ----------------------------------------------------------------------------- stdlib


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_documents(
    stats: SourceStats, root: str | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yields (relative posix path, bytes) of every stdlib *.py file, sorted by path."""
    root = root or stdlib_root()
    if not os.path.isdir(root):
        raise ValueError(f"data.source='stdlib': the stdlib directory {root!r} does not exist.")
    relpaths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                relpaths.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    for relpath in sorted(relpaths):
        with open(os.path.join(root, relpath), "rb") as f:
            text = f.read()
        stats.files += 1
        if not text:
            stats.skip("empty file", relpath, "no bytes", warn=False)  # empty __init__.py
            continue
        stats.add(text)
        yield relpath, text


# ----------------------------------------------------------------------------- files


def resolve_paths(spec: str, field_name: str = "data.path") -> list[str]:
    """Expands a comma-separated list of paths/globs into sorted, de-duplicated files.

    A directory means every supported file directly inside it. Raises ValueError
    naming the entry that matched nothing or has an unsupported suffix.
    """
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError(f"{field_name} is empty; give files or globs (comma-separated).")
    files: list[str] = []
    for entry in entries:
        entry = os.path.expanduser(entry)
        if os.path.isdir(entry):
            matches = [os.path.join(entry, n) for n in os.listdir(entry) if n.endswith(SUFFIXES)]
        else:
            matches = glob.glob(entry, recursive=True)
        matches = sorted(m for m in matches if os.path.isfile(m))
        if not matches:
            raise ValueError(f"{field_name}: {entry!r} matches no file.")
        for m in matches:
            if not m.endswith(SUFFIXES):
                raise ValueError(
                    f"{field_name}: {m!r} has an unsupported suffix; supported: {', '.join(SUFFIXES)}."
                )
        files.extend(m for m in matches if m not in files)
    return files


def file_documents(
    files: Sequence[str], text_field: str, stats: SourceStats
) -> Iterator[tuple[bytes, bytes]]:
    """Yields (key = text, text) for every document of the files, in file order."""
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    for path in files:
        stats.files += 1
        if os.path.getsize(path) == 0:
            stats.skip("empty file", path, "0 bytes")
            continue
        reader = readers[os.path.splitext(path)[1]]
        for where, text in reader(path, text_field, stats):
            if not text:
                stats.skip("empty document", where, "no text")
                continue
            stats.add(text)
            yield text, text


def _read_txt(path: str, text_field: str, stats: SourceStats) -> Iterator[tuple[str, bytes]]:
    del text_field, stats
    with open(path, "rb") as f:
        yield path, f.read()


def _read_jsonl(path: str, text_field: str, stats: SourceStats) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                stats.skip("blank jsonl line", where, "blank line")
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                stats.skip("invalid jsonl line", where, f"invalid JSON ({e})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                stats.skip("jsonl line without text field", where, f"no string field {text_field!r}")
                continue
            # surrogatepass: JSON can carry lone surrogates ("\udc80"); keep their bytes.
            yield where, record[text_field].encode("utf-8", errors="surrogatepass")


def _read_parquet(path: str, text_field: str, stats: SourceStats) -> Iterator[tuple[str, bytes]]:
    import pyarrow  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    def unreadable(e: Exception) -> ValueError:  # pyarrow's messages do not name the file
        return ValueError(f"{path} is not a readable parquet file ({e}); replace it or leave it out of data.path.")

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise unreadable(e) from e
    if text_field not in parquet.schema_arrow.names:
        stats.skip(
            "parquet file without text field",
            path,
            f"no column {text_field!r} (columns: {parquet.schema_arrow.names})",
        )
        return
    row = 0
    batches = parquet.iter_batches(columns=[text_field])
    while True:
        try:
            batch = next(batches, None)
        except (pyarrow.ArrowException, OSError) as e:
            raise unreadable(e) from e
        if batch is None:
            return
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield f"{path}:row {row}", value.encode("utf-8", errors="surrogatepass")
            elif isinstance(value, bytes):
                yield f"{path}:row {row}", value
            else:
                stats.skip("parquet row without text", f"{path}:row {row}", f"{text_field!r} is {value!r}")


# ----------------------------------------------------------------------------- corpus


def load_corpus(
    source: str,
    *,
    path: str = "",
    eval_path: str = "",
    text_field: str = "text",
    validation_fraction: float = 0.0,
) -> Corpus:
    """Reads every document of `source` ('stdlib' | 'files') and splits them.

    With `eval_path`, the validation split is those files and `path` is all
    training data; otherwise validation_fraction of documents (by key) is held out.
    Raises ValueError if no document remains.
    """
    stats = SourceStats()
    if source == "stdlib":
        train, validation = split(stdlib_documents(stats), validation_fraction)
        where = f"the stdlib at {stdlib_root()!r}"
    elif source == "files":
        files = resolve_paths(path)
        if eval_path:
            train, _ = split(file_documents(files, text_field, stats), 0.0)
            eval_files = resolve_paths(eval_path, "data.eval_path")
            _, validation = split(file_documents(eval_files, text_field, stats), 1.0)
        else:
            train, validation = split(file_documents(files, text_field, stats), validation_fraction)
        where = f"data.path={path!r}" + (f", data.eval_path={eval_path!r}" if eval_path else "")
    else:
        raise ValueError(f"data.source={source!r}; use 'stdlib' or 'files'.")
    if not train and not validation:
        raise ValueError(
            f"data: no documents in {where} ({stats.files} files read; skipped: "
            f"{dict(stats.skipped) or 'nothing'}). Check data.path and data.text_field={text_field!r}."
        )
    logging.info(
        "data: %d documents (%d train, %d validation), %.1f MB from %d files of %s; "
        "%d not valid UTF-8; skipped %s",
        stats.documents, len(train), len(validation), stats.bytes / 1e6, stats.files, where,
        stats.non_utf8_documents, dict(stats.skipped) or "nothing",
    )  # fmt: skip
    return Corpus(train=train, validation=validation, stats=stats)
