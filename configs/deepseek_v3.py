"""DeepSeek-V3 / R1 (671B total, 37B activated): the released `config.json`, shape-only on CPU.

Use with `python -m deepseek_jax.params --config configs/deepseek_v3.py`, or to import the real weights.
"""

import ml_collections

from deepseek_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = defaults.parse_variant(arg, mtp=1, dtype="bfloat16")
    config = defaults.base_config()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,  # Dense layers' FFN width.
        moe_intermediate_size=2048,  # Each expert's FFN width.
        num_hidden_layers=61,
        first_k_dense_replace=3,  # Layers 0-2 dense, 3-60 MoE.
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,  # 8 groups (nodes) ...
        topk_group=4,  # ... each token reaches at most 4.
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        num_nextn_predict_layers=opts.mtp,
        dtype=opts.dtype,
        moe_dispatch="ragged",
        remat="deepseek",
    ))
    return config
