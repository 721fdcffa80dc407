"""The CPU default: a ~5M-parameter DeepSeek-V3 in miniature (every mechanism of the real one).

Variants: `configs/tiny.py:mtp=0`, `:dispatch=dense`, `:remat=deepseek` (comma-separated).
"""

import ml_collections

from deepseek_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = defaults.parse_variant(arg, mtp=1, dispatch="ragged", remat="none")
    config = defaults.base_config()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=264,  # 256 bytes + 8 special ids (end of document, padding, reserved).
        hidden_size=256,  # D.
        intermediate_size=512,  # FFN width of the dense first layer.
        moe_intermediate_size=128,  # FFN width of each routed and shared expert.
        num_hidden_layers=4,  # 1 dense + 3 MoE.
        first_k_dense_replace=1,  # Layers before this index use the dense MLP.
        num_attention_heads=4,  # H.
        q_lora_rank=96,  # Q: query latent (None = full-rank query projection, as in V2-Lite).
        kv_lora_rank=64,  # C: the KV latent, all a cache stores besides the rope key.
        qk_nope_head_dim=32,  # K: per-head query/key width without position.
        qk_rope_head_dim=16,  # R: decoupled rope width (shared key across heads).
        v_head_dim=32,  # V: per-head value width.
        n_routed_experts=8,  # E.
        n_shared_experts=1,  # Always-on experts.
        num_experts_per_tok=2,  # K routed experts per token.
        n_group=4,  # Expert groups (device groups in V3) ...
        topk_group=2,  # ... of which each token may use this many.
        topk_method="noaux_tc",  # Auxiliary-loss-free balancing with a selection bias.
        scoring_func="sigmoid",  # Affinity s = sigmoid(x W_gate).
        norm_topk_prob=True,  # Normalise the selected affinities to sum 1 ...
        routed_scaling_factor=2.5,  # ... then scale them, as V3 does.
        rope_theta=10000.0,
        rope_scaling=None,  # No YaRN at this context length.
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        num_nextn_predict_layers=opts.mtp,  # MTP depth.
        dtype="float32",  # Compute dtype on CPU.
        moe_dispatch=opts.dispatch,
        remat=opts.remat,
    ))
    # About 4 minutes on 2 CPU cores: 400 steps of 8 x 256 bytes of Python source.
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.steps = 400
    config.train.warmup_steps = 30
    config.train.learning_rate = 3e-3
    config.train.eval_every = 100
    config.train.eval_batches = 8
    config.checkpoint.every = 100
    return config
