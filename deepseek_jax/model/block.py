"""One decoder layer: pre-norm MLA then a pre-norm dense MLP or DeepSeekMoE, each with a residual.

Legend: B batch, T time, D model, E routed experts.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import MLP, Matmul, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE


def empty_router_stats(cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """Stats a dense layer reports, so dense and MoE layers return the same structure."""
    return {"expert_counts": jnp.zeros((cfg.n_routed_experts,), jnp.float32),
            "balance_loss": jnp.zeros((), jnp.float32)}


class Block(nn.Module):
    """x [B, T, D] -> (x [B, T, D], router stats {'expert_counts' [E], 'balance_loss' []})."""

    cfg: ModelConfig
    moe: bool
    matmul: Matmul | None = None

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        cfg = self.cfg
        attn_in = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x_BTD)
        h = x_BTD + MLA(cfg, matmul=self.matmul, name="self_attn")(attn_in, positions_BT, segment_ids_BT)
        ffn_in = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        if self.moe:
            y, stats = MoE(cfg, matmul=self.matmul, name="mlp")(ffn_in, segment_ids_BT != 0)
        else:
            y = MLP(cfg, cfg.intermediate_size, matmul=self.matmul, name="mlp")(ffn_in)
            stats = empty_router_stats(cfg)
        return (h + y).astype(x_BTD.dtype), stats
