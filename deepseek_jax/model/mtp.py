"""Multi-Token Prediction modules (DeepSeek-V3 section 2.2).

Legend: B batch, T time, D model, k depth (1-based).

Module k sees, at position i, the previous depth's representation h^{k-1}_i and the embedding of the
token k steps ahead, t_{i+k}, and predicts t_{i+k+1}:
    h'_i  = W_eh [RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)]        (embedding half first, as the
                                                                          released checkpoints store it)
    h^k_i = RMSNorm_out(Block(h'))_i,   logits = Head(h^k_i)
h^0 is the main model's final-normed hidden state (what its head sees). The embedding and the output
head are the main model's own (shared, one set of weights, applied by model/transformer.py); each module
has its own norms, projection and decoder block (names as in the checkpoints: enorm, hnorm, eh_proj,
shared_head.norm). The block takes a decode cache like any decoder layer (model/block.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.model.block import recomputed_block
from deepseek_jax.model.cache import LayerCache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.experts import Dispatch
from deepseek_jax.model.layers import Linear, RMSNorm, compute_dtype
from deepseek_jax.ops.recipe import Recipe


def shift_left(tokens_BT: jnp.ndarray, k: int, fill: int = 0) -> jnp.ndarray:
    """tokens[:, i + k], with `fill` past the end (those positions are masked out of the loss)."""
    if k == 0:
        return tokens_BT
    pad = jnp.full((tokens_BT.shape[0], k), fill, tokens_BT.dtype)
    return jnp.concatenate([tokens_BT[:, k:], pad], axis=1)


class MTPModule(nn.Module):
    """(h^{k-1} [B,T,D], Emb(t_{i+k}) [B,T,D]) -> (h^k [B,T,D] final-normed, (router stats, cache entries)).

    Optional: one layer's cache [B, S, *] and its lengths [B], as for a decoder layer.
    """

    cfg: ModelConfig
    recipe: Recipe | None = None
    dispatch: Dispatch | None = None
    cached_attention: str = "absorbed"

    @nn.compact
    def __call__(self, h_prev_BTD: jnp.ndarray, emb_ahead_BTD: jnp.ndarray, positions_BT: jnp.ndarray,
                 segment_ids_BT: jnp.ndarray, cache: LayerCache | None = None, lengths_B: jnp.ndarray | None = None
                 ) -> tuple[jnp.ndarray, tuple[dict[str, jnp.ndarray], LayerCache | None]]:
        cfg = self.cfg
        joined = jnp.concatenate([RMSNorm(cfg.rms_norm_eps, name="enorm")(emb_ahead_BTD),
                                  RMSNorm(cfg.rms_norm_eps, name="hnorm")(h_prev_BTD)], axis=-1)
        x = Linear(cfg.hidden_size, ("mtp_concat", "embed"), compute_dtype(cfg), recipe=self.recipe,
                   name="eh_proj")(joined)
        x, out = recomputed_block(cfg)(cfg, moe=cfg.mtp_uses_moe, recipe=self.recipe, dispatch=self.dispatch,
                       cached_attention=self.cached_attention, name="block")(
            x, positions_BT, segment_ids_BT, cache, lengths_B)
        return RMSNorm(cfg.rms_norm_eps, name="norm")(x), out
