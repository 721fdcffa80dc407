"""The MLA latent KV cache: per token and layer only c_KV and the shared rotated rope key, nothing per head.

Legend: L layers of a stack, B batch, S cache slots, T new tokens, C kv latent (kv_lora_rank),
R rope head dim (qk_rope_head_dim), I indexer head width (index_head_dim, sparse attention only).

One fixed-size buffer of S slots per row, allocated once (so decoding never recompiles), plus
`lengths` [B]: the number of valid leading slots of each row; slot s holds position s. Entries at or
beyond a row's length are stale: attention never reads them (`past_mask`) and the next write starting
at `lengths` overwrites them. Rolling back rejected speculative tokens is therefore only a matter of
setting `lengths` back.

The stacks mirror the parameters (model/names.py): the scanned decoder stacks and, for
speculative decoding, MTP_CACHE (the MTP modules' blocks, depth as the L axis). The model's pieces take
an optional cache (model/transformer.py): given one, each layer attends over [its cache ; the new
tokens] and the new tokens' entries are written at lengths .. lengths+T-1; `lengths` is left to the
caller (the decoder decides how many written tokens become valid).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import compute_dtype
from deepseek_jax.model.names import MTP_CACHE, stack_lengths


@flax.struct.dataclass
class LayerCache:
    """What MLA keeps per token: the normalised latent and the rotated rope key (shared by all heads), and
    under sparse attention (V3.2) the lightning indexer's key."""

    c_kv: jnp.ndarray  # [L, B, S, C] (or [B, S, C] for one layer, or [.., T, ..] for new entries)
    k_rope: jnp.ndarray  # [L, B, S, R]
    index_k: jnp.ndarray | None = None  # [L, B, S, I]; None for dense attention.


@flax.struct.dataclass
class KVCache:
    layers: dict[str, LayerCache]  # Stack name -> its layers' cache.
    lengths: jnp.ndarray  # int32 [B]: valid slots per row.

    @property
    def size(self) -> int:
        """S, the slots per row."""
        return next(iter(self.layers.values())).c_kv.shape[2]

    def positions(self, num_new: int) -> jnp.ndarray:
        """int32 [B, T]: the positions (= slots) of T new tokens, lengths .. lengths+T-1."""
        return self.lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]

    def write(self, name: str, new: LayerCache, layer: int | None = None) -> KVCache:
        """Stores new entries [L, B, T, *] (or [B, T, *] into `layer`) at slots lengths .. lengths+T-1.

        Leaves `lengths` alone: the caller decides how many of the written tokens become valid. Callers
        size the cache so writes fit; a slot past the end would be dropped, never clamped onto valid ones.
        """
        stack = self.layers[name]
        B, T = self.lengths.shape[0], new.c_kv.shape[-2]
        rows_B1 = jnp.arange(B)[:, None]
        slots_BT = self.positions(T)
        lead = slice(None) if layer is None else layer

        def put(buffer: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
            return buffer.at[lead, rows_B1, slots_BT].set(values.astype(buffer.dtype), mode="drop")

        updated = jax.tree.map(put, stack, new)
        return self.replace(layers={**self.layers, name: updated})


def stack_depths(cfg: ModelConfig, mtp: bool) -> dict[str, int]:
    """Layers per cached stack (the MTP stack only when `mtp` and the model has MTP modules)."""
    depths = stack_lengths(cfg)
    if mtp and cfg.num_nextn_predict_layers:
        depths[MTP_CACHE] = cfg.num_nextn_predict_layers
    return depths


def init_cache(cfg: ModelConfig, batch: int, size: int, *, mtp: bool = False) -> KVCache:
    """An empty cache of `size` slots per row, in the compute dtype."""
    dtype = compute_dtype(cfg)
    def zeros(depth: int, width: int) -> jnp.ndarray:
        return jnp.zeros((depth, batch, size, width), dtype)

    layers = {name: LayerCache(zeros(depth, cfg.kv_lora_rank), zeros(depth, cfg.qk_rope_head_dim),
                               zeros(depth, cfg.index_head_dim) if cfg.sparse_attention else None)
              for name, depth in stack_depths(cfg, mtp).items()}
    return KVCache(layers, jnp.zeros((batch,), jnp.int32))


def cache_shapes(cfg: ModelConfig, batch: int, size: int, *, mtp: bool = False) -> KVCache:
    """The cache `init_cache` would allocate, as jax.ShapeDtypeStruct leaves (nothing allocated)."""
    return jax.eval_shape(functools.partial(init_cache, cfg, batch, size, mtp=mtp))


def bytes_per_token(cache: KVCache) -> int:
    """Bytes the cache spends per token (all layers), from its arrays' shapes and dtypes."""
    per_row_slot = 0
    for stack in cache.layers.values():
        for leaf in jax.tree.leaves(stack):
            _, B, S = leaf.shape[:3]
            per_row_slot += leaf.size // (B * S) * jnp.dtype(leaf.dtype).itemsize
    return per_row_slot


def past_mask(lengths_B: jnp.ndarray, size: int, num_new: int) -> jnp.ndarray:
    """Boolean [B, 1, T, S + T] for T new tokens attending over [cache slots ; themselves].

    A cache slot is visible iff it is valid (< lengths); new token t sees new tokens t' <= t.
    """
    B, T = lengths_B.shape[0], num_new
    valid_BS = jnp.arange(size, dtype=jnp.int32)[None, :] < lengths_B[:, None]
    past = jnp.broadcast_to(valid_BS[:, None, None, :], (B, 1, T, size))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None, None], (B, 1, T, T))
    return jnp.concatenate([past, causal], axis=-1)
