"""Streaming access to a directory of safetensors shards: read one tensor at a time, write shard by shard.

Reading uses `safetensors.safe_open(framework="numpy")`, which memory-maps a shard and materialises only the
tensor asked for. safetensors 0.8's numpy binding has no float8 dtype, so FP8 tensors are read straight from
the file at the offsets in its header (the format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw little-endian data).

Writing streams too: the header is computed from the tensors' shapes and dtypes up front, then each
tensor's bytes are produced and written in turn, so an export never holds more than one tensor on the host.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
RAW_READ = ("F8_E4M3", "F8_E5M2")  # Not readable through safe_open(framework="numpy").


class TensorInfo(NamedTuple):
    file: pathlib.Path
    dtype: str  # safetensors dtype name, e.g. 'BF16', 'F8_E4M3'.
    shape: tuple[int, ...]
    data_start: int  # Absolute byte offset of the data in `file`.


def read_header(file: pathlib.Path) -> dict[str, TensorInfo]:
    """The tensors of one shard, from its JSON header (no tensor data is read)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its 8-byte header length).")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    data_end = 8 + length + max((h["data_offsets"][1] for h in header.values()), default=0)
    size = os.path.getsize(file)
    if size < data_end:
        raise ValueError(f"{file} is truncated: its header describes {data_end:,} bytes, the file holds {size:,}. "
                         "Download that shard again.")
    return {name: TensorInfo(file, h["dtype"], tuple(h["shape"]), 8 + length + h["data_offsets"][0])
            for name, h in header.items()}


class CheckpointFiles:
    """The tensors of a HF checkpoint directory: `model.safetensors.index.json` + shards, or bare shards."""

    def __init__(self, path: str | pathlib.Path):
        self.root = pathlib.Path(path)
        if not (self.root / "config.json").is_file():
            raise ValueError(f"{self.root} is not a Hugging Face checkpoint: it has no config.json.")
        self.config = json.loads((self.root / "config.json").read_text())
        index_file = self.root / INDEX_FILE
        if index_file.is_file():
            weight_map: Mapping[str, str] = json.loads(index_file.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.root / f).is_file()]
            if missing:
                lost = sorted(n for n, f in weight_map.items() if f in missing)
                raise ValueError(f"{INDEX_FILE} lists shard(s) {missing} that are not in {self.root}; they hold "
                                 f"{len(lost)} tensors, e.g. {lost[:5]}. Download the missing shards.")
        else:
            weight_map = {}
            files = sorted(p.name for p in self.root.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.root} holds no *.safetensors files.")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            for tensor, info in read_header(self.root / name).items():
                if tensor in self.tensors:
                    raise ValueError(f"tensor {tensor!r} is stored twice: in {self.tensors[tensor].file.name} "
                                     f"and {name}.")
                self.tensors[tensor] = info
        absent = sorted(n for n, f in weight_map.items() if n not in self.tensors)
        if absent:
            raise ValueError(f"{INDEX_FILE} maps {len(absent)} tensors to shards that do not contain them, e.g. "
                             f"{[(n, weight_map[n]) for n in absent[:5]]}.")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """One tensor (or a slice of its first axis) in its stored dtype, as a host numpy array."""
        info = self.tensors[name]
        if info.dtype in RAW_READ:
            dtype = DTYPES[info.dtype]
            row = math.prod(info.shape[1:]) if info.shape else 1
            start, stop, _ = (rows or slice(None)).indices(info.shape[0] if info.shape else 1)
            out = np.fromfile(info.file, dtype=dtype, count=(stop - start) * row,
                              offset=info.data_start + start * row * dtype.itemsize)
            return out.reshape((stop - start,) + info.shape[1:]) if info.shape else out.reshape(())
        with safe_open(str(info.file), framework="numpy") as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]


class TensorSpec(NamedTuple):
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]  # Called once, when the tensor is written.

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_file(file: pathlib.Path, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
    """Writes one safetensors shard, producing (and dropping) one tensor at a time."""
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # Data starts 8-byte aligned, as the reference writer does.
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for s in specs:
            data = np.ascontiguousarray(s.produce())
            if data.dtype != s.dtype or data.shape != s.shape:
                raise ValueError(f"tensor {s.name!r} was produced as {data.dtype}{list(data.shape)}, "
                                 f"expected {s.dtype}{list(s.shape)}.")
            f.write(data.reshape(-1).view(np.uint8).data)


def write_sharded(root: pathlib.Path, specs: list[TensorSpec], max_shard_bytes: int) -> dict[str, str]:
    """Splits `specs` (in order) into shards of at most `max_shard_bytes` (a bigger tensor gets its own shard),
    writes them as model-0000i-of-0000n.safetensors plus the index. Returns the weight map."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_file(root / name, group)
        weight_map.update({s.name: name for s in group})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
