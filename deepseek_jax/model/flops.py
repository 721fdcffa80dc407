"""Analytic training FLOPs per token (forward + backward), for throughput and MFU figures.

XLA's cost analysis counts a `while` loop's body once, so it undercounts a model whose layers run under
`scan`; this count is exact for the matmuls instead:
    6 x (matmul parameters a token passes through)        weights: forward 2, backward 4 per parameter
  + 6 x T x H x (qk_head_dim + v_head_dim) per layer      attention scores and values over T keys
The input embedding is a lookup (no FLOPs); the output head and every MTP module are matmuls.
Causal masking is not discounted (the usual convention, e.g. PaLM's MFU).
"""

from __future__ import annotations

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.param_count import count_params


def matmul_params_per_token(cfg: ModelConfig) -> float:
    """Parameters in weight matmuls that one token uses: main model and MTP modules."""
    counts = count_params(cfg)
    norms_per_layer = 2 * cfg.hidden_size + cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    main = counts["activated"] - counts["embedding"] - cfg.num_hidden_layers * norms_per_layer - cfg.hidden_size
    mtp_layers = cfg.num_nextn_predict_layers
    mtp_expert_params = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.n_routed_experts
    idle = (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) * mtp_expert_params if cfg.mtp_uses_moe else 0
    mtp = counts["mtp"] - mtp_layers * (idle + norms_per_layer + 3 * cfg.hidden_size)
    # Each MTP depth also runs the shared output head.
    return main + mtp + mtp_layers * cfg.hidden_size * cfg.vocab_size


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attention = 6 * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * layers
    return 6 * matmul_params_per_token(cfg) + attention
