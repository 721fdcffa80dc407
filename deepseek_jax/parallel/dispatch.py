"""Which MoE dispatch the model runs with, for every context a run has, decided here and nowhere else.

`ModelConfig.moe_dispatch` names the strategy (model/experts.py): 'dense', 'ragged' and 'gather' run on
each device's own tokens; 'ep' moves tokens to experts split over the mesh's 'expert' axis, and its
implementation is injected into the model (`implementation`), as the FP8 recipe is.

    training_model_config  the trainer's model: 'ep' whenever the batch is split over devices (the
                           capacity factor from config.parallel), node-limited routing if asked for
    inside_pipeline        a pipeline stage, already inside the pipeline's shard_map: each device
                           routes its own rows ('ragged') ...
    pipeline_experts       ... but the MoE stack's experts, split over 'expert' within the stage, are
                           reached by all-to-all from there (expert parallelism inside the pipeline)
    for_evaluation         validation never drops tokens (capacity factor 0)
    for_one_device         the end-of-run sample, on one device ('ragged')
    for_decoding           a decoding pass over few tokens gathers only its experts' weights ('gather')
"""

from __future__ import annotations

import ml_collections

from deepseek_jax.checks import need
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.experts import Dispatch
from deepseek_jax.parallel.expert_parallel import ExpertParallel, ExpertParallelInShardMap


def implementation(cfg: ModelConfig) -> Dispatch | None:
    """The dispatch to inject for `cfg`: expert parallelism for 'ep' (with cfg's capacity), else None."""
    return ExpertParallel(capacity_factor=cfg.moe_capacity_factor) if cfg.moe_dispatch == "ep" else None


def training_model_config(config: ml_collections.ConfigDict, cfg: ModelConfig) -> ModelConfig:
    """`cfg` as the trainer runs it: the expert dispatch inside a shard_map whenever the batch is split
    over devices (all-to-all when experts are split too, with the configured capacity; with 'expert' = 1
    each device runs every expert on its own tokens, where the global sort of the 'ragged' dispatch would
    make XLA all-gather every token: experiments/results/bench_ep.md), and node-limited routing if asked
    for. (A pipeline's stages take `inside_pipeline` of this.)"""
    if "parallel" not in config:
        return cfg
    p = config.parallel
    if p.data * p.expert > 1 and cfg.n_routed_experts:
        cfg = cfg.replace(moe_dispatch="ep", moe_capacity_factor=float(p.capacity_factor))
    if p.node_limit:
        nodes = p.nodes or p.expert
        need(nodes >= 2, "parallel.node_limit", p.node_limit,
             "node-limited routing needs parallel.nodes >= 2 (or parallel.expert >= 2 device groups).")
        try:
            cfg = cfg.replace(node_groups=nodes, node_limit=p.node_limit)
        except ValueError as e:
            raise ValueError(f"config.parallel.node_limit={p.node_limit} / nodes={nodes}: {e}") from e
    return cfg


def inside_pipeline(cfg: ModelConfig) -> ModelConfig:
    """A pipeline stage's model: the pipeline's shard_map already hands each device its own rows."""
    if cfg.moe_dispatch == "ep":
        return cfg.replace(moe_dispatch="ragged", moe_capacity_factor=0.0)
    return cfg


def pipeline_experts(cfg: ModelConfig, expert_devices: int) -> tuple[ModelConfig, Dispatch | None]:
    """The MoE stack's (config, injected dispatch) in a pipeline stage whose experts are split over
    `expert_devices` devices of the 'expert' axis (1: no expert parallelism, `inside_pipeline`)."""
    if expert_devices == 1 or not cfg.n_routed_experts:
        return inside_pipeline(cfg), None
    return (cfg.replace(moe_dispatch="ep"),
            ExpertParallelInShardMap(ep=expert_devices, capacity_factor=cfg.moe_capacity_factor))


def for_evaluation(cfg: ModelConfig) -> ModelConfig:
    """Validation never drops tokens."""
    return cfg.replace(moe_capacity_factor=0.0)


def for_one_device(cfg: ModelConfig) -> ModelConfig:
    """A model run on one device (no mesh): the dropless grouped-GEMM dispatch."""
    return cfg.replace(moe_dispatch="ragged", moe_capacity_factor=0.0)


def for_decoding(cfg: ModelConfig, num_tokens: int) -> ModelConfig:
    """A pass over `num_tokens` tokens: 'gather' when they route to no more (token, expert) pairs than there
    are experts (decoding: reading only the chosen experts' weights beats touching them all), else cfg's."""
    if cfg.n_routed_experts and num_tokens * cfg.num_experts_per_tok <= cfg.n_routed_experts:
        return cfg.replace(moe_dispatch="gather")
    return cfg
