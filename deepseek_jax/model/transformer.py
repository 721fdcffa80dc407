"""The DeepSeek-V3 model: embedding, dense then MoE decoder layers, final norm, output head, MTP.

Legend: B batch, T time, D model, V vocabulary, L layers, E routed experts, P MTP depth.

Layers of one kind are stacked and run under `nn.scan` (params gain a leading 'layers' axis), so compile
time does not grow with depth and a pipeline stage is a slice of the stack. The variables are
    {'params': ..., 'routing': {<module>: ... e_score_correction_bias [L, E]}}
and the router statistics come back keyed by the same top-level module names:
    {'dense_layers'|'moe_layers': {'expert_counts': [L, E], 'balance_loss': [L]}, 'mtp_0': {...: [E]}, ...}
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.model import remat
from deepseek_jax.model.block import Block
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import Linear, Matmul, RMSNorm, compute_dtype
from deepseek_jax.model.moe import ROUTING
from deepseek_jax.model.mtp import MTPModule, shift_left


class ModelOutput(NamedTuple):
    logits: jnp.ndarray  # [B, T, V] float32: position i predicts token i+1.
    mtp_logits: jnp.ndarray | None  # [P, B, T, V] float32: depth k (0-based) at i predicts token i+k+2.
    router_stats: dict  # See the module docstring.


def layer_stack(cfg: ModelConfig, moe: bool, length: int, matmul: Matmul | None, name: str) -> nn.Module:
    """`length` decoder layers of one kind as one scanned module, with the configured recomputation."""
    block_cls = Block
    policy = remat.POLICIES[cfg.remat]
    if cfg.remat != "none":
        block_cls = nn.remat(Block, policy=policy, prevent_cse=False)
    scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0, ROUTING: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, moe, matmul, name=name)


def default_positions(tokens_BT: jnp.ndarray) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None, :], tokens_BT.shape)


class DeepSeekV3(nn.Module):
    """tokens [B, T] int32 -> ModelOutput.

    positions [B, T]: rope positions (default 0..T-1). segment_ids [B, T]: document of each token in
    a packed row, 0 = padding (default all 1); attention never crosses documents.
    """

    cfg: ModelConfig
    matmul: Matmul | None = None  # The FP8 recipe's matmul for every eligible Linear, or None.

    def setup(self) -> None:
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        if cfg.num_dense_layers:
            self.dense_layers = layer_stack(cfg, False, cfg.num_dense_layers, self.matmul, "dense_layers")
        if cfg.num_moe_layers:
            self.moe_layers = layer_stack(cfg, True, cfg.num_moe_layers, self.matmul, "moe_layers")
        self.norm = RMSNorm(cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), compute_dtype(cfg), high_precision=True)
        self.mtp = [MTPModule(cfg, self.matmul, name=f"mtp_{k}") for k in range(cfg.num_nextn_predict_layers)]

    def head(self, h_BTD: jnp.ndarray) -> jnp.ndarray:
        """Final-normed hidden [B, T, D] -> float32 logits [B, T, V]."""
        return self.lm_head(h_BTD).astype(jnp.float32)

    def __call__(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
                 segment_ids_BT: jnp.ndarray | None = None, run_mtp: bool = True) -> ModelOutput:
        cfg = self.cfg
        positions = default_positions(tokens_BT) if positions_BT is None else positions_BT
        segments = jnp.ones_like(tokens_BT) if segment_ids_BT is None else segment_ids_BT
        stats = {}
        x = self.embed_tokens(tokens_BT)
        if cfg.num_dense_layers:
            x, stats["dense_layers"] = self.dense_layers(x, positions, segments)
        if cfg.num_moe_layers:
            x, stats["moe_layers"] = self.moe_layers(x, positions, segments)
        h = self.norm(x)
        logits = self.head(h)
        mtp_logits = []
        for k, module in enumerate(self.mtp if run_mtp else [], start=1):
            h, stats[f"mtp_{k - 1}"] = module(h, self.embed_tokens(shift_left(tokens_BT, k)), positions, segments)
            mtp_logits.append(self.head(h))
        return ModelOutput(logits, jnp.stack(mtp_logits) if mtp_logits else None, stats)
