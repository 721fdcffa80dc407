"""Export: (ModelConfig, variables) -> a Hugging Face DeepSeek checkpoint directory (single process).

The inverse of `hf_import`: kernels transposed back to [out, in], stacked layers and experts split into one
tensor each, MTP modules written as the extra decoder layers `model.layers.{num_hidden_layers + k}` with
the copies of the embedding and output head that DeepSeek's checkpoints carry. Tensors are produced and
written one at a time (`safetensors_io.write_sharded`), so host memory stays near one tensor.

Storage dtypes: 'float32' (everything), 'bfloat16' (everything but the routing biases, which transformers
keeps in float32), or 'float8_e4m3fn' as DeepSeek releases V3: the decoder layers' linear weights in E4M3
with a float32 `<name>_scale_inv` per 128x128 block, everything else bfloat16 (routing biases float32).

FP8 round trips are exact: weights that were dequantised from an FP8 checkpoint and not changed since are
re-quantised to the same bytes. The block scale is `amax / 448` rounded in float32, and quantisers round it
differently (ours multiplies by 1/448, DeepSeek's divides), so when a block's scale does not reproduce it
bit for bit, the neighbouring float32 scales are tried (`quantize_exact`).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import jax
import ml_dtypes
import numpy as np

from deepseek_jax.convert import hf_config, layout
from deepseek_jax.convert.hf_import import SCALE_SUFFIX
from deepseek_jax.convert.safetensors_io import TensorSpec, write_sharded
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.ops import fp8_quant

EXPORT_DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
# The weights DeepSeek stores in FP8: every linear layer of a decoder layer (MTP layers included), not the
# router, the MTP projection, the embedding or the output head.
FP8_WEIGHTS = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"
                         r"|o_proj)|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")
F32, BF16, F8 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)

_quantize = jax.jit(fp8_quant.quantize_blockwise_2d, static_argnames=("block", "dtype"))
# One stacked entry (layer, expert) of a variable; the index is traced, so one compile per variable shape.
_entry = jax.jit(lambda array, index: array[index])


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    """[R, C] -> zero-padded [ceil(R/b), b, ceil(C/b), b]."""
    padded = np.pad(x, [(0, -x.shape[0] % block), (0, -x.shape[1] % block)])
    return padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)


def quantize_exact(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 block quantisation of a float32 [R, C] weight that reproduces FP8-representable blocks exactly.

    Returns (q [R, C] float8_e4m3fn, scale_inv [ceil(R/b), ceil(C/b)] float32), from `quantize_blockwise_2d`
    except on blocks that some other scale within 2 float32 ulps (or amax / 448 by division) represents
    exactly, i.e. blocks of an FP8 checkpoint passed through unchanged.
    """
    q, scale = (np.asarray(a) for a in _quantize(w, block=block))
    blocks = _blocks(w, block)
    scale4 = scale[:, None, :, None]
    exact = np.all(_blocks(q.astype(np.float32), block) * scale4 == blocks, axis=(1, 3), keepdims=True)
    if exact.all():
        return q, scale
    amax = np.max(np.abs(blocks), axis=(1, 3), keepdims=True)
    candidates = [(amax / np.float32(fp8_quant.fp8_max(F8))).astype(np.float32)]
    for direction in (-np.inf, np.inf):
        c = scale4
        for _ in range(2):
            c = np.nextafter(c, np.float32(direction))
            candidates.append(c)
    chosen = scale4.copy()
    for c in candidates:
        c = np.maximum(c, np.float32(fp8_quant.FLOAT32_TINY))
        ok = np.all((blocks / c).astype(F8).astype(np.float32) * c == blocks, axis=(1, 3), keepdims=True)
        chosen = np.where(ok & ~exact, c, chosen)
        exact |= ok
    q = (blocks / chosen).astype(F8).reshape(blocks.shape[0] * block, -1)[:w.shape[0], :w.shape[1]]
    return np.ascontiguousarray(q), chosen[:, 0, :, 0]


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


class _Exporter:
    def __init__(self, cfg: ModelConfig, variables: Any, fmt: hf_config.CheckpointFormat, dtype: str):
        self.cfg, self.fmt, self.dtype = cfg, fmt, dtype
        self.plan = layout.leaves(cfg)
        flat = jax.tree_util.tree_flatten_with_path(variables)[0]
        self.arrays = {tuple(k.key for k in path): x for path, x in flat}
        wanted = {leaf.path: leaf.shape for leaf in self.plan}
        wrong = sorted("/".join(p) + f" {list(self.arrays[p].shape)} (config: {list(s)})"
                       for p, s in wanted.items() if p in self.arrays and tuple(self.arrays[p].shape) != s)
        missing = sorted("/".join(p) for p in wanted if p not in self.arrays)
        extra = sorted("/".join(p) for p in self.arrays if p not in wanted)
        if wrong or missing or extra:
            raise ValueError(f"variables do not match the model config: missing {missing}, unexpected {extra}, "
                             f"wrong shape {wrong}.")
        self._scales: dict[str, np.ndarray] = {}

    def hf_tensor(self, leaf: layout.Leaf, index: tuple[int, ...]) -> np.ndarray:
        """float32 HF-layout tensor of one stacked entry of `leaf`."""
        array = self.arrays[leaf.path]
        if isinstance(array, jax.Array) and array.is_fully_addressable and {d.platform for d in array.devices()} == {
                "cpu"} and len(array.devices()) == 1:
            array = np.asarray(array)  # A view of the CPU buffer: no copy, no compile per entry.
        entry = array[index] if isinstance(array, np.ndarray) or not index else _entry(array, index)
        x = np.asarray(jax.device_get(entry), np.float32)
        if leaf.transpose:
            x = x.T
        if leaf.rope is not None and not self.fmt.rope_interleave:
            x = x[layout.rope_row_order(leaf.rope, x.shape[0], to_interleaved=False)]
        return np.ascontiguousarray(x)

    def storage(self, name: str) -> np.dtype:
        if name.endswith("e_score_correction_bias") or self.dtype == "float32":
            return F32
        if self.dtype == "float8_e4m3fn" and FP8_WEIGHTS.fullmatch(name):
            return F8
        return BF16

    def specs_for(self, name: str, shape: tuple[int, ...], produce) -> list[TensorSpec]:
        dtype = self.storage(name)
        if dtype != F8:
            return [TensorSpec(name, dtype, shape, lambda: produce().astype(dtype))]
        block = self.fmt.fp8_block
        grid = tuple(fp8_quant.num_tiles(d, block) for d in shape)

        def weight():
            q, self._scales[name] = quantize_exact(produce(), block)
            return q

        def scale():
            if name not in self._scales:  # Written before its weight: quantise again.
                weight()
            return self._scales.pop(name)

        return [TensorSpec(name, F8, shape, weight), TensorSpec(name + SCALE_SUFFIX, F32, grid, scale)]

    def specs(self) -> list[TensorSpec]:
        out, producers = [], {}
        for leaf in self.plan:
            for index in leaf.stacked_indices():
                name = leaf.name_at(index)
                producers[name] = (leaf.hf_shape, lambda leaf=leaf, index=index: self.hf_tensor(leaf, index))
        for copy, main in layout.redundant_names(self.cfg).items():
            producers[copy] = producers[main]
        for name, (shape, produce) in producers.items():
            out += self.specs_for(name, shape, produce)
        return sorted(out, key=lambda s: _natural_key(s.name))


def save_checkpoint(model_config: ModelConfig, variables: Any, path: str, *, dtype: str = "float32",
                    base_config: dict[str, Any] | None = None, fp8_block: int = 128,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes (model_config, variables) as a Hugging Face checkpoint: shards + index + config.json.

    Args:
      model_config: the model's configuration.
      variables: {'params': ..., 'routing': ...} as from `deepseek_jax.model.init` or `load_checkpoint`.
      path: output directory (created; existing files of the same names are overwritten).
      dtype: 'float32', 'bfloat16' or 'float8_e4m3fn' (DeepSeek's FP8 release format, `fp8_block` blocks).
      base_config: a config.json to start from (e.g. the imported checkpoint's): its token ids and rope style
        are kept, and `rope_interleave=False` there makes the export write half-split rope rows back; a dict
        of bookkeeping keys only (e.g. {'eos_token_id': 1}) just adds them.
      max_shard_bytes: shard size limit (a larger single tensor gets a shard of its own).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {EXPORT_DTYPES}.")
    base = dict(base_config or {})
    architecture = (base.get("architectures") or [hf_config.default_architecture(model_config)])[0]
    fmt = hf_config.CheckpointFormat(architecture, bool(base.get("rope_interleave", True)),
                                     fp8_block if dtype == "float8_e4m3fn" else None)
    if set(base) - hf_config.IGNORED_KEYS:
        hf_config.from_hf(base)  # A base with model keys must itself be a config we understand.
    exporter = _Exporter(model_config, variables, fmt, dtype)
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    write_sharded(root, exporter.specs(), max_shard_bytes)
    torch_dtype = "float32" if dtype == "float32" else "bfloat16"
    config = hf_config.to_hf(model_config, fmt, base, torch_dtype=torch_dtype)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
