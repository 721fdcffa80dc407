"""One decoder layer: pre-norm MLA then a pre-norm dense MLP or DeepSeekMoE, each with a residual.

Legend: B batch, T time, D model, S cache slots, C kv latent, R rope head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.model import remat
from deepseek_jax.model.cache import LayerCache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.experts import Dispatch
from deepseek_jax.model.layers import MLP, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE
from deepseek_jax.ops.recipe import Recipe


class Block(nn.Module):
    """x [B, T, D] -> (x [B, T, D], (router stats, new cache entries)).

    Router stats: a MoE layer's {'expert_counts' [E], 'balance_loss' [], 'dropped' []}, a dense layer's {};
    while a sparse-attention model trains its indexer (cfg.indexer_loss), also 'indexer_kl' [] (model/mla.py).
    Given one layer's cache [B, S, *] and its lengths [B], attention runs over [cache ; x] and the new
    entries are LayerCache([B, T, C], [B, T, R]); otherwise None (model/mla.py).
    """

    cfg: ModelConfig
    moe: bool
    recipe: Recipe | None = None
    dispatch: Dispatch | None = None
    cached_attention: str = "absorbed"

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray,
                 cache: LayerCache | None = None, lengths_B: jnp.ndarray | None = None
                 ) -> tuple[jnp.ndarray, tuple[dict[str, jnp.ndarray], LayerCache | None]]:
        cfg = self.cfg
        attn_in = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x_BTD)
        attn, entries, indexer_kl = MLA(cfg, recipe=self.recipe, cached_attention=self.cached_attention,
                                        name="self_attn")(attn_in, positions_BT, segment_ids_BT, cache, lengths_B)
        h = x_BTD + attn
        ffn_in = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        if self.moe:
            y, stats = MoE(cfg, recipe=self.recipe, dispatch=self.dispatch, name="mlp")(ffn_in, segment_ids_BT != 0)
        else:
            y, stats = MLP(cfg, cfg.intermediate_size, recipe=self.recipe, name="mlp")(ffn_in), {}
        if indexer_kl is not None:
            stats = {**stats, "indexer_kl": indexer_kl}
        return (h + y).astype(x_BTD.dtype), (stats, entries)


def recomputed_block(cfg: ModelConfig) -> type[nn.Module]:
    """`Block`, under the configured recomputation policy (model/remat.py) unless remat='none'."""
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=remat.POLICIES[cfg.remat], prevent_cse=False)
