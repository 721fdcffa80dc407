"""DeepSeek-V2-Lite (15.7B total, 2.4B activated): no query latent, softmax gate, 2 shared experts."""

import ml_collections

from deepseek_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = defaults.parse_variant(arg, dtype="bfloat16")
    config = defaults.base_config()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,  # Full-rank query projection.
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        topk_method="greedy",  # No group limit, no balancing bias.
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        num_nextn_predict_layers=0,
        dtype=opts.dtype,
        moe_dispatch="ragged",
        remat="deepseek",
    ))
    return config
