"""Configs: the three architectures load, impossible combinations are named, parameter counts."""

import json
import subprocess
import sys

import pytest
from common import ROOT, config, model_config

from deepseek_jax import defaults
from deepseek_jax.model.param_count import count_params


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3", "deepseek_v2_lite"])
def test_configs_load_and_validate(name):
    cfg = model_config(name)
    assert cfg.num_dense_layers + cfg.num_moe_layers == cfg.num_hidden_layers


def test_tiny_matches_the_issue():
    cfg = model_config("tiny")
    assert cfg.vocab_size <= 512 and cfg.num_hidden_layers >= 4 and cfg.first_k_dense_replace == 1
    assert cfg.n_routed_experts >= 8 and cfg.n_group >= 4 and cfg.n_shared_experts == 1
    assert cfg.num_nextn_predict_layers == 1


@pytest.mark.parametrize("overrides, field", [
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),  # 2 groups of 2 experts reachable.
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(moe_dispatch="magic"), "moe_dispatch"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling.type"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling.original_max_position_embeddings"),
    (dict(remat="sometimes"), "remat"),
    (dict(n_group=8, topk_group=4), "n_group"),  # noaux_tc needs two experts per group.
])
def test_impossible_combinations_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"config.model.{field}"):
        model_config(**overrides)


def test_unknown_and_missing_keys():
    from deepseek_jax.model import ModelConfig

    d = config("tiny").model.to_dict()
    with pytest.raises(ValueError, match="unknown keys.*'hidden_sise'"):
        ModelConfig.from_dict({**d, "hidden_sise": 3})
    del d["kv_lora_rank"]
    with pytest.raises(ValueError, match="missing required keys.*kv_lora_rank"):
        ModelConfig.from_dict(d)


def test_variant_arguments():
    assert config("tiny", "mtp=0,dispatch=dense").model.num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match="expected key=value"):
        defaults.parse_variant("mpt=0", mtp=1)
    with pytest.raises(ValueError, match="not a int"):
        defaults.parse_variant("mtp=two", mtp=1)


def test_tiny_param_count_by_hand():
    D, V, H, Q, C, K, R, Vh = 256, 264, 4, 96, 64, 32, 16, 32
    E, F, F_dense = 8, 128, 512
    attention = (D * Q + Q  # q_a_proj, q_a_layernorm
                 + Q * H * (K + R)  # q_b_proj
                 + D * (C + R) + C  # kv_a_proj_with_mqa, kv_a_layernorm
                 + C * H * (K + Vh)  # kv_b_proj
                 + H * Vh * D)  # o_proj
    layer_norms = 2 * D
    dense_layer = attention + layer_norms + 3 * D * F_dense
    moe_layer = attention + layer_norms + D * E + 3 * E * D * F + 3 * D * F  # gate, routed, 1 shared
    total = V * D + dense_layer + 3 * moe_layer + D + D * V  # embedding, layers, final norm, head
    activated = total - 3 * (E - 2) * 3 * D * F  # 6 of 8 routed experts idle per MoE layer
    mtp = 2 * D + 2 * D * D + moe_layer + D  # enorm, hnorm, eh_proj, block, output norm
    counts = count_params(model_config("tiny"))
    assert counts == {"total": total, "activated": activated, "mtp": mtp, "embedding": V * D}


def test_deepseek_v3_matches_the_report_via_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_jax.params", "--config", str(ROOT / "configs/deepseek_v3.py"), "--json"],
        check=True, capture_output=True, text=True, cwd=ROOT).stdout
    counts = json.loads(out)
    assert abs(counts["total"] - 671e9) / 671e9 < 0.005
    assert 36.5e9 <= counts["activated"] <= 37.6e9
    assert 11e9 < counts["mtp"] < 12e9  # One MoE layer + eh_proj; embedding and head are shared.


def test_deepseek_v2_lite_total():
    counts = count_params(model_config("deepseek_v2_lite"))
    assert abs(counts["total"] - 15.7e9) / 15.7e9 < 0.005
    # 2.4B activated excluding the input embedding (DeepSeek-V2's convention).
    assert abs(counts["activated"] - counts["embedding"] - 2.4e9) / 2.4e9 < 0.03
