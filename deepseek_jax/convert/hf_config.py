"""Hugging Face `config.json` <-> `ModelConfig` for the DeepSeek-V3 family (V3, R1, V3.2, V2, V2-Lite).

Every key of a checkpoint's config is accounted for: it maps to a `ModelConfig` field, describes the storage
format (`CheckpointFormat`: architecture, rope layout, FP8 blocks), is checked to hold the only value we
implement (e.g. `hidden_act='silu'`), or is bookkeeping that cannot change the forward pass (token ids, the
original run's loss coefficients). Anything else is a ValueError naming the key.

Both config styles are read: DeepSeek's released one (`rope_theta` + `rope_scaling={'type': 'yarn', ...}`)
and transformers 5's (`rope_parameters={'rope_type': 'yarn', 'rope_theta': ..., ...}`, `head_dim` = the
rope width, `num_mtp_layers` as an alias of `num_nextn_predict_layers`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from deepseek_jax.model.config import INDEXER_FIELDS, ModelConfig

V3, V32, V2 = "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV2ForCausalLM"
MODEL_TYPES = {V3: "deepseek_v3", V32: "deepseek_v32", V2: "deepseek_v2"}

# ModelConfig fields read 1:1 from config.json (rope is handled separately).
MODEL_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
    "topk_group", "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
    "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "max_position_embeddings", "rms_norm_eps", "num_nextn_predict_layers")


def model_keys(architecture: str) -> tuple[str, ...]:
    """The ModelConfig fields an architecture's config.json holds 1:1."""
    return MODEL_KEYS + (INDEXER_FIELDS if architecture == V32 else ())  # Only V3.2 has a lightning indexer.


# Values the architecture implies when a config leaves the key out (transformers' own class defaults).
ARCH_DEFAULTS = {
    V3: dict(topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=1),
    V32: dict(topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=1, index_n_heads=64,
              index_head_dim=128, index_topk=2048),
    V2: dict(topk_method="greedy", scoring_func="softmax", num_nextn_predict_layers=0, norm_topk_prob=False,
             routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=0),
}

# Keys that cannot change the forward pass: token ids, storage dtype, the original run's training knobs.
IGNORED_KEYS = frozenset({
    "_name_or_path", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "output_router_logits", "aux_loss_alpha", "seq_aux",
    "ep_size", "pretraining_tp"})

ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rope_interleave")
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """How a checkpoint stores the model, beyond what `ModelConfig` describes."""

    architecture: str = V3  # 'DeepseekV3ForCausalLM' or 'DeepseekV2ForCausalLM'.
    rope_interleave: bool = True  # False: rope channels stored half-split (rotate_half layout).
    fp8_block: int | None = None  # Edge of the FP8 weight-scale blocks; None = not quantised.


def _fail(key: str, problem: str, fix: str) -> None:
    raise ValueError(f"config.json: {key} {problem}. {fix}.")


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures")
    model_type = hf.get("model_type")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in MODEL_TYPES:
            _fail("'architectures'", f"= {archs!r} is not supported",
                  f"deepseek_jax reads exactly one of {sorted(MODEL_TYPES)}")
        arch = archs[0]
        if model_type is not None and model_type != MODEL_TYPES[arch]:
            _fail("'model_type'", f"= {model_type!r} contradicts architectures={archs!r}",
                  f"use model_type={MODEL_TYPES[arch]!r}")
        return arch
    by_type = {v: k for k, v in MODEL_TYPES.items()}
    if model_type not in by_type:
        _fail("'model_type'", f"= {model_type!r} is not a supported architecture (and 'architectures' is absent)",
              f"deepseek_jax reads model_type in {sorted(by_type)}")
    return by_type[model_type]


def _check_fixed(hf: Mapping[str, Any]) -> set[str]:
    """Keys whose only supported value is checked here; returns the keys handled."""
    heads = hf.get("num_attention_heads")
    rope, nope = hf.get("qk_rope_head_dim"), hf.get("qk_nope_head_dim")
    qk = None if rope is None or nope is None else rope + nope
    layers, dense = hf.get("num_hidden_layers"), hf.get("first_k_dense_replace")
    mlp_types = None if layers is None or dense is None else ["dense"] * dense + ["sparse"] * (layers - dense)
    rules = {
        "hidden_act": (lambda v: v == "silu", "the experts and MLPs are SwiGLU (silu)"),
        "attention_bias": (lambda v: not v, "MLA projections have no bias"),
        "mlp_bias": (lambda v: not v, "MLPs have no bias"),
        "tie_word_embeddings": (lambda v: not v, "the output head is a separate matrix"),
        "moe_layer_freq": (lambda v: v == 1, "every layer from first_k_dense_replace on is MoE"),
        "attention_dropout": (lambda v: not v, "attention dropout is not implemented"),
        "num_key_value_heads": (lambda v: v is None or v == heads, "MLA has one key/value head per query head"),
        "qk_head_dim": (lambda v: v == qk, "it must equal qk_nope_head_dim + qk_rope_head_dim"),
        # transformers 5 sets head_dim to the rope width (its rotary code reads it); older tools used q/k width.
        "head_dim": (lambda v: v is None or v in (rope, qk), "it must be qk_rope_head_dim (transformers 5) "
                     "or qk_nope_head_dim + qk_rope_head_dim"),
        # transformers' V3.2 config spells out per layer what first_k_dense_replace and DSA already say.
        "mlp_layer_types": (lambda v: v == mlp_types, "layers below first_k_dense_replace are dense, the rest MoE"),
        "layer_types": (lambda v: v == ["indexed_attention"] * layers, "every V3.2 layer runs sparse attention"),
    }
    for key, (ok, why) in rules.items():
        if key in hf and not ok(hf[key]):
            _fail(repr(key), f"= {hf[key]!r} is not supported: {why}", "Fix the value or drop the key")
    return set(rules)


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling in ModelConfig form) from either config style."""
    params, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    if params is not None and scaling is not None:
        _fail("'rope_parameters' and 'rope_scaling'", "are both set", "keep one of them")
    where = "rope_parameters" if params is not None else "rope_scaling"
    p = dict(params if params is not None else scaling or {})
    theta = p.pop("rope_theta", hf.get("rope_theta"))
    if theta is None:
        _fail("'rope_theta'", "is missing", "add the rotary base (10000 for DeepSeek-V2/V3)")
    rope_type, legacy_type = p.pop("rope_type", None), p.pop("type", None)
    if rope_type and legacy_type and rope_type != legacy_type:
        _fail(f"'{where}'", f"has rope_type={rope_type!r} but type={legacy_type!r}", "keep one of them")
    kind = rope_type or legacy_type or "default"
    if kind == "default":
        if p:
            _fail(f"'{where}'", f"has keys {sorted(p)} for the default (unscaled) rope", "remove them")
        return float(theta), None
    if kind != "yarn":
        _fail(f"'{where}.rope_type'", f"= {kind!r} is not supported", "deepseek_jax implements 'default' and 'yarn'")
    if p.pop("truncate", True) is not True:
        _fail(f"'{where}.truncate'", "= False is not supported", "DeepSeek's YaRN truncates the correction range")
    extra = sorted(set(p) - set(YARN_KEYS))
    if extra:
        _fail(f"'{where}'", f"has unsupported YaRN keys {extra}", f"keep only {list(YARN_KEYS)}")
    if p.get("factor") is None:
        _fail(f"'{where}.factor'", "is missing", "YaRN needs the context-extension factor")
    # transformers fills a missing original length with max_position_embeddings (standardize_rope_params).
    p.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    if (m is not None and m != 1 and not m_all) or (not m and m_all):
        logging.warning(
            "rope %s has mscale=%r, mscale_all_dim=%r: transformers 5 scales cos/sin by yarn_mscale(factor) here, "
            "DeepSeek's reference code (and deepseek_jax) by yarn_mscale(factor, mscale) / "
            "yarn_mscale(factor, mscale_all_dim); logits will differ from transformers.", where, m, m_all)
    return float(theta), {"type": "yarn", **{k: p[k] for k in YARN_KEYS if p.get(k) is not None}}


def _fp8_block(hf: Mapping[str, Any]) -> int | None:
    q = hf.get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != "fp8":
        _fail("'quantization_config.quant_method'", f"= {q.get('quant_method')!r} is not supported",
              "deepseek_jax dequantises DeepSeek's block-scaled 'fp8' checkpoints only")
    if q.get("fmt", "e4m3") != "e4m3":
        _fail("'quantization_config.fmt'", f"= {q.get('fmt')!r} is not supported", "use e4m3 weights")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and block[0] > 0):
        _fail("'quantization_config.weight_block_size'", f"= {block!r} is not supported",
              "deepseek_jax reads square weight blocks, e.g. [128, 128]")
    extra = sorted(set(q) - {"quant_method", "fmt", "weight_block_size", "activation_scheme",
                             "modules_to_not_convert"})
    if extra:
        _fail("'quantization_config'", f"has unsupported keys {extra}", "remove them")
    return int(block[0])


def from_hf(hf: Mapping[str, Any]) -> tuple[ModelConfig, CheckpointFormat]:
    """A checkpoint's config.json -> (validated ModelConfig, CheckpointFormat). Raises ValueError naming keys."""
    arch = _architecture(hf)
    hf = dict(hf)
    if "num_mtp_layers" in hf:
        alias = hf.pop("num_mtp_layers")
        if hf.setdefault("num_nextn_predict_layers", alias) != alias:
            _fail("'num_mtp_layers'", f"= {alias} contradicts num_nextn_predict_layers="
                  f"{hf['num_nextn_predict_layers']}", "keep one of them")
    keys = model_keys(arch)
    handled = set(keys) | set(ROPE_KEYS) | _check_fixed(hf) | IGNORED_KEYS | {
        "architectures", "model_type", "quantization_config"}
    unknown = sorted(set(hf) - handled)
    if unknown:
        _fail(f"keys {unknown}", f"are not understood by deepseek_jax's {arch} import",
              "Remove them if they do not change the model, or extend deepseek_jax/convert/hf_config.py")
    values = {**ARCH_DEFAULTS[arch], **{k: hf[k] for k in keys if k in hf}}
    if arch == V2:  # transformers' V2 config stores a missing group setting as null.
        values["n_group"] = values["n_group"] or 1
        values["topk_group"] = values["topk_group"] or 1
    missing = sorted(set(MODEL_KEYS) - set(values))
    if missing:
        _fail(f"keys {missing}", "are missing", "add them (DeepSeek's released config.json has all of them)")
    if arch in (V3, V32) and (values["scoring_func"], values["topk_method"]) != ("sigmoid", "noaux_tc"):
        _fail("'scoring_func'/'topk_method'", f"= {values['scoring_func']!r}/{values['topk_method']!r}",
              f"{arch} routes with sigmoid affinities and noaux_tc only")
    if arch == V2:
        if values["scoring_func"] != "softmax" or values["topk_method"] not in ("greedy", "group_limited_greedy"):
            _fail("'scoring_func'/'topk_method'", f"= {values['scoring_func']!r}/{values['topk_method']!r}",
                  "DeepseekV2ForCausalLM routes with softmax and greedy or group_limited_greedy")
        if values["norm_topk_prob"]:
            logging.warning("norm_topk_prob=True on a V2 model: DeepSeek's code (and deepseek_jax) normalise the "
                            "top-k weights, transformers 5's DeepseekV2 ignores the flag; logits will differ.")
    theta, scaling = _rope(hf)
    rope_interleave = hf.get("rope_interleave", True)
    if arch in (V2, V32) and rope_interleave is not True:
        _fail("'rope_interleave'", f"= {rope_interleave!r}", f"{arch} checkpoints always store MLA's rope interleaved")
    try:
        cfg = ModelConfig.from_dict({**values, "rope_theta": theta, "rope_scaling": scaling})
    except ValueError as e:
        raise ValueError(f"config.json describes an invalid model: {e}") from e
    return cfg, CheckpointFormat(arch, bool(rope_interleave), _fp8_block(hf))


def default_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes `cfg`: V3 for sigmoid + noaux_tc routing (V3.2 with sparse
    attention), V2 for softmax."""
    if cfg.n_routed_experts == 0 or (cfg.scoring_func, cfg.topk_method) == ("sigmoid", "noaux_tc"):
        return V32 if cfg.sparse_attention else V3
    if cfg.sparse_attention:
        raise ValueError(f"No Hugging Face DeepSeek class combines sparse attention (index_topk="
                         f"{cfg.index_topk}) with scoring_func={cfg.scoring_func!r}: DeepseekV32ForCausalLM routes "
                         "with sigmoid/noaux_tc.")
    if cfg.scoring_func == "softmax" and cfg.topk_method in ("greedy", "group_limited_greedy"):
        return V2
    raise ValueError(f"No Hugging Face DeepSeek class routes with scoring_func={cfg.scoring_func!r} and "
                     f"topk_method={cfg.topk_method!r}: use sigmoid/noaux_tc (V3) or softmax/greedy (V2).")


def to_hf(cfg: ModelConfig, fmt: CheckpointFormat, base: Mapping[str, Any] | None = None,
          torch_dtype: str = "float32") -> dict[str, Any]:
    """ModelConfig -> config.json. Bookkeeping keys of `base` (token ids, ...) are kept; the model keys,
    rope and quantisation are rewritten. The rope is written in `base`'s style (transformers 5's
    `rope_parameters` or the released `rope_theta` + `rope_scaling`), released style by default."""
    if (fmt.architecture == V32) != cfg.sparse_attention:
        raise ValueError(f"{fmt.architecture} does not match the model: index_topk={cfg.index_topk} "
                         f"(sparse attention is DeepseekV32ForCausalLM's, and only its): export as "
                         f"{default_architecture(cfg)}.")
    base = dict(base or {})
    out = {k: v for k, v in base.items() if k in IGNORED_KEYS and k not in ("torch_dtype", "dtype")}
    out.update(architectures=[fmt.architecture], model_type=MODEL_TYPES[fmt.architecture], hidden_act="silu",
               attention_bias=False, tie_word_embeddings=False, num_key_value_heads=cfg.num_attention_heads,
               torch_dtype=torch_dtype)
    out.update({k: getattr(cfg, k) for k in model_keys(fmt.architecture)})
    if fmt.architecture == V2 and cfg.num_nextn_predict_layers == 0:
        del out["num_nextn_predict_layers"]
    scaling = None if cfg.rope_scaling is None else {k: v for k, v in cfg.rope_scaling.items()
                                                     if k not in ("type", "rope_type")}
    if "rope_parameters" in base:
        out["rope_parameters"] = {"rope_type": "default" if scaling is None else "yarn",
                                  "rope_theta": cfg.rope_theta, **(scaling or {})}
        out["head_dim"] = cfg.qk_rope_head_dim
    else:
        out["rope_theta"] = cfg.rope_theta
        out["rope_scaling"] = None if scaling is None else {"type": "yarn", **scaling}
    if fmt.architecture == V3:
        out["rope_interleave"] = fmt.rope_interleave
    if fmt.fp8_block:
        out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [fmt.fp8_block, fmt.fp8_block]}
    for key, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config key {key!r} = {value!r} is not representable in config.json")
    return dict(sorted(out.items()))
