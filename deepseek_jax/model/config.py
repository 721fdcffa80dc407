"""The model configuration: Hugging Face DeepSeek-V3 key names, validated once into a frozen dataclass.

`config.model` in every `configs/*.py` is an `ml_collections.ConfigDict` whose keys are those of a
DeepSeek-V3 checkpoint's `config.json`; `ModelConfig.from_dict` checks it and freezes it. Modules receive
the frozen `ModelConfig` and use `.replace(...)` for variants (a different MoE dispatch, say).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

from deepseek_jax.checks import fail, is_int
from deepseek_jax.model.remat import POLICIES as REMAT_POLICIES

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
MOE_DISPATCHES = ("dense", "ragged", "gather", "ep")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("yarn",)
# Fields that choose how the model is computed or routed at run time, not which weights it has: a checkpoint
# may be resumed or loaded with other values.
RUNTIME_FIELDS = ("dtype", "moe_dispatch", "remat", "moe_capacity_factor", "node_groups", "node_limit",
                  "scan_layers", "indexer_loss")
# How a sparse-attention model trains its lightning indexer (V3.2 report, section 2.1.1; model/indexer.py).
INDEXER_LOSSES = ("off", "dense", "sparse")
# The lightning indexer's shape (V3.2's config.json keys too): all > 0 for sparse attention, all 0 for V3.
INDEXER_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3-family architecture (HF key names) plus how we compute it.

    Attributes past `num_nextn_predict_layers` are ours, not Hugging Face's.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # FFN width of the dense layers (the first `first_k_dense_replace`).
    moe_intermediate_size: int  # FFN width of one routed (or shared) expert.
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    max_position_embeddings: int
    rms_norm_eps: float
    num_nextn_predict_layers: int
    # DeepSeek Sparse Attention (V3.2, model/indexer.py): a lightning indexer of `index_n_heads` heads of
    # width `index_head_dim` per attention layer picks each query's `index_topk` keys. 0 = dense MLA (V3).
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # --- ours ---
    dtype: str = "float32"  # Compute dtype; params are always float32.
    moe_dispatch: str = "ragged"  # 'dense' (reference), 'ragged' (sort + ragged_dot), 'gather' (decoding),
    # 'ep' (expert parallelism: all-to-all over the mesh's 'expert' axis, parallel/expert_parallel.py).
    moe_capacity_factor: float = 0.0  # 'ep' only: per-device buffer = factor x fair share; 0 = dropless.
    node_groups: int = 0  # Node-limited routing: the experts form this many contiguous device groups ...
    node_limit: int = 0  # ... and each token uses experts on at most this many of them (0 = no limit).
    remat: str = "none"  # Backward recomputation policy, see model/remat.py.
    indexer_loss: str = "off"  # Sparse attention's indexer training: 'off'; 'dense' (warm-up: attention stays
    # dense, the indexer learns its distribution by KL); 'sparse' (top-k attention, KL on the selected keys).
    scan_layers: bool = True  # Layers of a stack in one loop (compile time flat in depth); False unrolls it
    # (XLA's cost analysis then counts every layer: it counts a loop body once).

    def __post_init__(self) -> None:
        # Flax hashes module attributes (the config is one), so the YaRN dict is frozen here.
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def sparse_attention(self) -> bool:
        """Every attention layer runs the lightning indexer and attends to its top-k keys only (V3.2)."""
        return self.index_topk > 0

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace if self.n_routed_experts else self.num_hidden_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def mtp_uses_moe(self) -> bool:
        """MTP blocks sit after the last decoder layer, so they are MoE whenever the model has experts."""
        return self.n_routed_experts > 0

    @property
    def uses_correction_bias(self) -> bool:
        """Only the auxiliary-loss-free method (`noaux_tc`) has a selection bias per expert."""
        return self.topk_method == "noaux_tc"

    def dense_attention(self) -> ModelConfig:
        """This model without its lightning indexers: V3's dense MLA (the same weights, less the indexers')."""
        return self.replace(**dict.fromkeys(INDEXER_FIELDS, 0), indexer_loss="off")

    def replace(self, **changes: Any) -> ModelConfig:
        return validate(dataclasses.replace(self, **changes))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds and validates from a ConfigDict / dict with HF key names (unknown keys are an error)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"config.model has unknown keys {unknown}; supported keys are {sorted(names)}.")
        missing = sorted(
            f.name for f in dataclasses.fields(cls)
            if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"config.model is missing required keys {missing}.")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])  # ConfigDict -> plain, frozen in __post_init__.
        return validate(cls(**d))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d


def _fail(field: str, problem: str, fix: str) -> None:
    fail(f"model.{field}", problem, fix)


def _check_positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not is_int(value) or value <= 0:
            _fail(name, f"must be a positive integer, got {value!r}", f"set {name} to an integer >= 1")


def _validate_rope_scaling(cfg: ModelConfig) -> None:
    rs = cfg.rope_scaling
    if rs is None:
        return
    kind = rs.get("type", rs.get("rope_type"))
    if kind not in ROPE_TYPES:
        _fail("rope_scaling.type", f"{kind!r} is not supported", f"use one of {ROPE_TYPES} or None")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            _fail(f"rope_scaling.{key}", "is required for YaRN", f"add rope_scaling.{key}")
    if rs["factor"] < 1:
        _fail("rope_scaling.factor", f"must be >= 1, got {rs['factor']}", "use a context-extension factor >= 1")
    allowed = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
               "beta_slow", "mscale", "mscale_all_dim"}
    extra = sorted(set(rs) - allowed)
    if extra:
        _fail("rope_scaling", f"unknown keys {extra}", f"keep only {sorted(allowed)}")


def _validate_routing(cfg: ModelConfig) -> None:
    if cfg.n_routed_experts == 0:
        return
    _check_positive(cfg, "n_group", "topk_group", "num_experts_per_tok", "moe_intermediate_size")
    if cfg.n_routed_experts % cfg.n_group:
        _fail("n_group", f"{cfg.n_routed_experts} routed experts do not split into {cfg.n_group} equal groups",
              "choose n_group dividing n_routed_experts")
    if cfg.topk_group > cfg.n_group:
        _fail("topk_group", f"{cfg.topk_group} groups kept out of only n_group={cfg.n_group}",
              "set topk_group <= n_group")
    if cfg.uses_correction_bias and cfg.topk_group < cfg.n_group and cfg.n_routed_experts // cfg.n_group < 2:
        _fail("n_group", "noaux_tc scores a group by its top-2 experts but groups hold only one",
              "use n_group <= n_routed_experts / 2")
    reachable = cfg.topk_group * (cfg.n_routed_experts // cfg.n_group)
    if cfg.num_experts_per_tok > reachable:
        _fail("num_experts_per_tok",
              f"{cfg.num_experts_per_tok} experts per token but the {cfg.topk_group} kept groups hold only "
              f"{reachable}", "lower num_experts_per_tok or raise topk_group")
    if cfg.scoring_func not in SCORING_FUNCS:
        _fail("scoring_func", f"{cfg.scoring_func!r} is not supported", f"use one of {SCORING_FUNCS}")
    if cfg.topk_method not in TOPK_METHODS:
        _fail("topk_method", f"{cfg.topk_method!r} is not supported", f"use one of {TOPK_METHODS}")
    if cfg.topk_method == "greedy" and cfg.topk_group != cfg.n_group:
        _fail("topk_group", "topk_method='greedy' ignores groups but topk_group < n_group",
              "set topk_group = n_group, or use 'group_limited_greedy' / 'noaux_tc'")
    if not cfg.routed_scaling_factor > 0:
        _fail("routed_scaling_factor", f"must be > 0, got {cfg.routed_scaling_factor}", "use e.g. 1.0 or 2.5")
    _validate_node_limit(cfg)
    if not cfg.moe_capacity_factor >= 0:
        _fail("moe_capacity_factor", f"must be >= 0, got {cfg.moe_capacity_factor}", "use 0 (dropless) or e.g. 1.25")
    if cfg.moe_capacity_factor and cfg.moe_dispatch != "ep":
        _fail("moe_capacity_factor", f"{cfg.moe_capacity_factor} needs moe_dispatch='ep' (got "
              f"{cfg.moe_dispatch!r}); the other dispatches never drop", "use 0, or expert parallelism")
    if cfg.moe_dispatch not in MOE_DISPATCHES:
        _fail("moe_dispatch", f"{cfg.moe_dispatch!r} is not a dispatch strategy", f"use one of {MOE_DISPATCHES}")


def _validate_node_limit(cfg: ModelConfig) -> None:
    """Node-limited routing (V3 section 2.1.2): at most `node_limit` of `node_groups` groups per token, each
    group scored by the sum of its K / node_limit highest affinities."""
    if not cfg.node_limit and not cfg.node_groups:
        return
    E, K, groups, limit = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.node_groups, cfg.node_limit
    if not (is_int(groups) and groups >= 2 and E % groups == 0):
        _fail("node_groups", f"{groups!r} must be >= 2 and divide the {E} routed experts",
              "use the number of expert-parallel device groups (parallel.expert), or 0 with node_limit=0")
    if not (is_int(limit) and 1 <= limit < groups and K % limit == 0 and K // limit <= E // groups):
        _fail("node_limit", f"{limit!r} must be in [1, node_groups={groups}), divide num_experts_per_tok={K}, "
              f"and leave K / node_limit <= {E // groups} experts per group", "use e.g. 4 of 8 groups for K=8")


def _validate_sparse_attention(cfg: ModelConfig) -> None:
    """The indexer's three keys are all set (> 0) or all 0, and the indexer has the inputs it reads."""
    values = {k: getattr(cfg, k) for k in INDEXER_FIELDS}
    for key, value in values.items():
        if not is_int(value) or value < 0:
            _fail(key, f"must be an integer >= 0, got {value!r}", "use 0 for dense attention (V3)")
    if cfg.indexer_loss not in INDEXER_LOSSES:
        _fail("indexer_loss", f"{cfg.indexer_loss!r} is not one of {INDEXER_LOSSES}", "use 'off', 'dense' or 'sparse'")
    if not any(values.values()):
        if cfg.indexer_loss != "off":
            _fail("indexer_loss", f"{cfg.indexer_loss!r} trains a lightning indexer this dense model does not have",
                  "set index_n_heads, index_head_dim and index_topk, or indexer_loss='off'")
        return
    unset = [k for k, v in values.items() if not v]
    if unset:
        _fail(unset[0], f"is 0 while {', '.join(f'{k}={v}' for k, v in values.items() if v)} turn the lightning "
              "indexer on", "set all of index_n_heads, index_head_dim, index_topk (V3.2: 64, 128, 2048), or all to 0")
    if cfg.q_lora_rank is None:
        _fail("q_lora_rank", "is None, but the lightning indexer projects its queries from the query latent",
              "give the model a q_lora_rank (V3.2: 1536), or set index_topk=0")
    if cfg.index_head_dim < cfg.qk_rope_head_dim:
        _fail("index_head_dim", f"{cfg.index_head_dim} is narrower than the qk_rope_head_dim={cfg.qk_rope_head_dim} "
              "channels the indexer rotates", f"use index_head_dim >= {cfg.qk_rope_head_dim}")


def validate(cfg: ModelConfig) -> ModelConfig:
    """Raises ValueError naming the field (and the fix) for any impossible combination."""
    _check_positive(cfg, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "max_position_embeddings", "intermediate_size")
    if cfg.q_lora_rank is not None:
        _check_positive(cfg, "q_lora_rank")
    if cfg.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"RoPE rotates pairs of channels, got the odd width {cfg.qk_rope_head_dim}",
              "use an even qk_rope_head_dim")
    if cfg.n_routed_experts < 0 or cfg.n_shared_experts < 0:
        _fail("n_routed_experts", "expert counts must be >= 0", "use 0 for a dense model")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        _fail("first_k_dense_replace", f"{cfg.first_k_dense_replace} is outside [0, num_hidden_layers="
              f"{cfg.num_hidden_layers}]", "use at most num_hidden_layers dense layers")
    if cfg.num_nextn_predict_layers < 0:
        _fail("num_nextn_predict_layers", "MTP depth must be >= 0", "use 0 to disable MTP")
    if not (cfg.rms_norm_eps > 0 and math.isfinite(cfg.rms_norm_eps)):
        _fail("rms_norm_eps", f"must be a small positive number, got {cfg.rms_norm_eps}", "use 1e-6")
    if cfg.rope_theta <= 0:
        _fail("rope_theta", f"must be > 0, got {cfg.rope_theta}", "use 10000")
    if cfg.dtype not in DTYPES:
        _fail("dtype", f"{cfg.dtype!r} is not a compute dtype", f"use one of {DTYPES}")
    _validate_rope_scaling(cfg)
    _validate_routing(cfg)
    _validate_sparse_attention(cfg)
    if not isinstance(cfg.scan_layers, bool):
        _fail("scan_layers", f"{cfg.scan_layers!r} is not a bool", "use True or False")
    if cfg.remat not in REMAT_POLICIES:
        _fail("remat", f"{cfg.remat!r} is not a policy", f"use one of {sorted(REMAT_POLICIES)}")
    return cfg
