"""Where each of our variables lives in a Hugging Face DeepSeek checkpoint, and how its layout differs.

Legend: L decoder layers, E routed experts, D model, F ffn, K nope head dim, R rope head dim, C kv latent.

One `Leaf` per variable of `deepseek_jax.model.abstract_variables(cfg)`, derived from its tree path:

    params/embed_tokens/embedding       [V, D]        model.embed_tokens.weight
    params/lm_head/kernel               [D, V]        lm_head.weight (transposed: HF Linear is [out, in])
    params/{dense,moe}_layers/<path>    [L, ...]      model.layers.{layer}.<path>.weight, one per layer
    .../mlp/experts/{gate,up,down}_proj [L, E, in, out]  model.layers.{layer}.mlp.experts.{expert}.*.weight
    routing/.../mlp/gate/e_score_correction_bias   model.layers.{layer}.mlp.gate.e_score_correction_bias
    params/mtp_{k}/{enorm,hnorm,eh_proj,norm}      model.layers.{L+k}.{enorm,hnorm,eh_proj,shared_head.norm}
    params/mtp_{k}/block/<path>                    model.layers.{L+k}.<path> (an ordinary decoder layer)
    .../self_attn/indexer/{wq_b,wk,weights_proj}/kernel, k_norm/{scale,bias}   ...self_attn.indexer.* (V3.2)

HF layer i is dense_layers[i] below first_k_dense_replace and moe_layers[i - first_k_dense_replace] above.
The MTP layers also store copies of the embedding and output head (`redundant_names`), which we share.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import jax
import numpy as np

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.functional import abstract_variables
from deepseek_jax.model.names import DENSE, EMBED, HEAD, NORM, STACKS, mtp_depth

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RopeRows:
    """Rope channels along a HF weight's output rows: rows [p*period + offset, p*period + offset + width)."""

    period: int
    offset: int
    width: int


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One variable and the HF tensors it is stacked from."""

    path: Path  # In our variables tree, e.g. ('params', 'moe_layers', 'mlp', 'experts', 'gate_proj').
    shape: tuple[int, ...]  # Our global shape, stacked axes first.
    hf_name: str  # HF tensor name, with '{layer}' / '{expert}' placeholders for stacked axes.
    layers: tuple[int, ...] = ()  # HF layer index of each entry of a leading 'layers' axis (empty: none).
    experts: int = 0  # > 0: the next axis stacks this many experts.
    transpose: bool = False  # HF Linear weight [out, in] <-> our kernel [in, out].
    rope: RopeRows | None = None  # Rope rows of the HF weight (permuted for half-split checkpoints).

    @property
    def num_stacked(self) -> int:
        return int(bool(self.layers)) + int(bool(self.experts))

    @property
    def hf_shape(self) -> tuple[int, ...]:
        own = self.shape[self.num_stacked:]
        return own[::-1] if self.transpose else own

    def stacked_indices(self) -> Iterator[tuple[int, ...]]:
        """Every index into the stacked axes, in order (the empty tuple for an unstacked leaf)."""
        axes = ([range(len(self.layers))] if self.layers else []) + ([range(self.experts)] if self.experts else [])
        return itertools.product(*axes)

    def name_at(self, index: tuple[int, ...]) -> str:
        """The HF tensor name at a stacked index."""
        fields = {}
        if self.layers:
            fields["layer"] = self.layers[index[0]]
        if self.experts:
            fields["expert"] = index[-1]
        return self.hf_name.format(**fields)

    def names(self) -> list[str]:
        return [self.name_at(i) for i in self.stacked_indices()]


def _rope_rows(cfg: ModelConfig, module: str) -> RopeRows | None:
    if module in ("q_proj", "q_b_proj"):
        return RopeRows(cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim)
    if module == "kv_a_proj_with_mqa":
        return RopeRows(cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    return None


def _in_layer(cfg: ModelConfig, path: Path, shape: tuple[int, ...], prefix: str, rest: Path,
              layers: tuple[int, ...]) -> Leaf:
    """A variable of one decoder layer; `rest` is its path inside the layer."""
    if rest[:2] == ("mlp", "experts") and len(rest) == 3:
        return Leaf(path, shape, f"{prefix}.mlp.experts.{{expert}}.{rest[2]}.weight", layers,
                    experts=shape[1 if layers else 0], transpose=True)
    if rest == ("mlp", "gate", "e_score_correction_bias"):
        return Leaf(path, shape, f"{prefix}.mlp.gate.e_score_correction_bias", layers)
    if rest[-1] in ("kernel", "scale"):
        return Leaf(path, shape, f"{prefix}.{'.'.join(rest[:-1])}.weight", layers, transpose=rest[-1] == "kernel",
                    rope=_rope_rows(cfg, rest[-2]) if rest[0] == "self_attn" else None)
    if rest[-1] == "bias":  # The lightning indexer's key LayerNorm (V3.2).
        return Leaf(path, shape, f"{prefix}.{'.'.join(rest[:-1])}.bias", layers)
    raise _unknown(path)


MTP_NAMES = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}
TOP_NAMES = {(EMBED, "embedding"): ("model.embed_tokens.weight", False),
             (NORM, "scale"): ("model.norm.weight", False),
             (HEAD, "kernel"): ("lm_head.weight", True)}


def _unknown(path: Path) -> ValueError:
    return ValueError(f"deepseek_jax.convert does not know where variable {'/'.join(path)} lives in a Hugging "
                      "Face checkpoint: extend deepseek_jax/convert/layout.py after a model change.")


def leaf_for(cfg: ModelConfig, path: Path, shape: tuple[int, ...]) -> Leaf:
    _, top, *rest = path
    rest = tuple(rest)
    if top in STACKS:
        first = 0 if top == DENSE else cfg.num_dense_layers
        return _in_layer(cfg, path, shape, "model.layers.{layer}", rest, tuple(range(first, first + shape[0])))
    if mtp_depth(top) is not None:
        prefix = f"model.layers.{cfg.num_hidden_layers + mtp_depth(top)}"
        if rest[0] == "block":
            return _in_layer(cfg, path, shape, prefix, rest[1:], ())
        if rest[0] in MTP_NAMES and len(rest) == 2:
            return Leaf(path, shape, f"{prefix}.{MTP_NAMES[rest[0]]}.weight", transpose=rest[1] == "kernel")
    if (top, *rest) in TOP_NAMES:
        name, transpose = TOP_NAMES[(top, *rest)]
        return Leaf(path, shape, name, transpose=transpose)
    raise _unknown(path)


def leaves(cfg: ModelConfig) -> list[Leaf]:
    """Every variable of the model for `cfg`, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_variables(cfg))[0]
    return [leaf_for(cfg, tuple(k.key for k in path), tuple(x.shape)) for path, x in flat]


def redundant_names(cfg: ModelConfig) -> dict[str, str]:
    """MTP layers' copies of shared tensors -> the main tensor they must equal."""
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{prefix}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{prefix}.shared_head.head.weight"] = "lm_head.weight"
    return out


def interleave_order(width: int) -> np.ndarray:
    """Row order taking a half-split rope block (x_0..x_{R/2-1}, y_0..y_{R/2-1}) to interleaved pairs (x_j, y_j)."""
    half = width // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def rope_row_order(rows: RopeRows, num_rows: int, to_interleaved: bool) -> np.ndarray:
    """Row permutation of a whole HF weight: half-split -> interleaved (import) or back (export)."""
    block = interleave_order(rows.width)
    if not to_interleaved:
        block = np.argsort(block)
    order = np.arange(num_rows)
    for start in range(rows.offset, num_rows, rows.period):
        order[start:start + rows.width] = start + block
    return order
