"""Start-up validation of a whole run config: each problem names the field and the fix."""

from __future__ import annotations

import jax
import ml_collections

from deepseek_jax.checks import is_int, need
from deepseek_jax.data.config import validate_data_config
from deepseek_jax.data.tokenizers import make_tokenizer, padded_vocab_size
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.pipeline.schedules import SCHEDULES
from deepseek_jax.train.checkpoint import parse_allow_changes
from deepseek_jax.train.optimizer import INDEXER_STAGES
from deepseek_jax.train.precision import recipe_for


def validate_train_config(t: ml_collections.ConfigDict) -> None:
    need(is_int(t.steps) and t.steps >= 1, "train.steps", t.steps, "use an integer >= 1.")
    need(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "use a positive learning rate.")
    need(is_int(t.warmup_steps) and 0 <= t.warmup_steps <= t.steps, "train.warmup_steps", t.warmup_steps,
         "use an integer between 0 and train.steps.")
    for name in ("decay_start", "final_lr_fraction", "mtp_lambda_switch"):
        need(0.0 <= t[name] <= 1.0, f"train.{name}", t[name], "use a fraction in [0, 1].")
    need(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, "train.b1/b2", (t.b1, t.b2), "use betas in [0, 1).")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "use >= 0.")
    need(t.clip_norm > 0, "train.clip_norm", t.clip_norm, "use a positive global-norm bound.")
    need(t.moment_dtype in ("", "float32", "bfloat16"), "train.moment_dtype", t.moment_dtype,
         "use '', 'float32' or 'bfloat16'.")
    need(t.get("indexer_stage", "") in INDEXER_STAGES, "train.indexer_stage", t.get("indexer_stage"),
         f"use one of {sorted(INDEXER_STAGES)}.")
    need(t.get("indexer_loss_weight", 1.0) >= 0, "train.indexer_loss_weight", t.get("indexer_loss_weight"),
         "use a weight >= 0.")
    for name in ("mtp_lambda", "mtp_lambda_late", "balance_alpha", "bias_update_speed"):
        need(t[name] >= 0, f"train.{name}", t[name], "use a non-negative weight (0 disables it).")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "use a decay in (0, 1), or 0 to disable.")
    for name in ("log_every", "eval_every", "max_bad_steps"):
        need(is_int(t[name]) and t[name] >= 1, f"train.{name}", t[name], "use an integer >= 1.")
    need(t.sample_temperature >= 0, "train.sample_temperature", t.sample_temperature, "use >= 0 (0 = greedy).")
    for name in ("eval_batches", "sample_tokens"):
        need(is_int(t[name]) and t[name] >= 0, f"train.{name}", t[name], "use an integer >= 0.")


def validate_parallel_config(config: ml_collections.ConfigDict, cfg: ModelConfig, device_count: int | None = None
                             ) -> None:
    """Checks `config.parallel` against the model and `device_count` devices (default: those of this
    process group, which must all be used when several processes train together)."""
    p = config.parallel
    have = jax.device_count() if device_count is None else device_count
    need(is_int(p.stage) and 1 <= p.stage <= have, "parallel.stage", p.stage,
         f"use 1 (no pipeline) up to the {have} devices available.")
    for axis in ("data", "expert", "tensor"):
        need(is_int(p[axis]) and p[axis] >= 1, f"parallel.{axis}", p[axis], "use an integer >= 1.")
    need(p.capacity_factor >= 0, "parallel.capacity_factor", p.capacity_factor, "use 0 (dropless) or e.g. 1.25.")
    need(p.capacity_factor == 0 or p.expert > 1, "parallel.capacity_factor", p.capacity_factor,
         "a capacity only applies to expert parallelism: set parallel.expert > 1 or use 0.")
    shape = (p.stage, p.data, p.expert, p.tensor)
    used = p.stage * p.data * p.expert * p.tensor
    whole = used == have or device_count is not None or jax.process_count() == 1
    need(used <= have and whole, "parallel.stage/data/expert/tensor", shape,
         f"their product is the number of devices used: at most the {have} there are, and all of "
         "them when several processes train together.")
    shards = p.data * p.expert
    need(config.data.batch_size % shards == 0, "data.batch_size", config.data.batch_size,
         f"use a multiple of parallel.data x parallel.expert = {shards}.")
    need(cfg.n_routed_experts % p.expert == 0, "parallel.expert", p.expert,
         f"use a divisor of the {cfg.n_routed_experts} routed experts.")
    need(cfg.num_attention_heads % p.tensor == 0, "parallel.tensor", p.tensor,
         f"use a divisor of the {cfg.num_attention_heads} attention heads.")
    mesh_lib.run_rules(p)  # Unknown names or axes in parallel.rules fail here.
    if p.stage == 1:
        return
    need(p.tensor == 1, "parallel.tensor", p.tensor,
         "the pipeline (parallel.stage > 1) combines with data and expert parallelism, not with tensor "
         "parallelism (its stages would need tensor-parallel collectives inside the pipeline's shard_map): set "
         "it to 1.")
    need(p.pipeline in SCHEDULES, "parallel.pipeline", p.pipeline, f"use one of {sorted(SCHEDULES)}.")
    need(is_int(p.microbatches) and p.microbatches >= 1 and config.data.batch_size % (p.microbatches * shards) == 0,
         "parallel.microbatches", p.microbatches,
         f"every micro-batch is split over parallel.data={p.data} x parallel.expert={p.expert}: use a divisor of "
         f"data.batch_size / {shards} = {config.data.batch_size / shards:g}.")
    stages = 2 * p.stage if p.pipeline == "dualpipev" else p.stage
    need(cfg.num_moe_layers % stages == 0, "parallel.stage", p.stage,
         f"the {cfg.num_moe_layers} MoE layers must split evenly into {stages} pipeline stages.")


def validate_run_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Checks every group once; returns the frozen model config."""
    for group in ("model", "data", "train", "checkpoint"):
        if group not in config:
            raise ValueError(f"config has no '{group}' group; build configs on defaults.base_config().")
    cfg = ModelConfig.from_dict(config.model)
    validate_data_config(config.data)
    validate_train_config(config.train)
    c = config.checkpoint
    need(is_int(c.every) and c.every >= 1, "checkpoint.every", c.every, "use an integer >= 1.")
    need(is_int(c.keep) and c.keep >= 1, "checkpoint.keep", c.keep, "keep at least one checkpoint.")
    if "rl" not in config:  # the RL jobs check theirs (rl/config.py)
        parse_allow_changes(c.allow_changes)
    if "parallel" in config:
        validate_parallel_config(config, cfg)
    stage = config.train.get("indexer_stage", "")
    need(not stage or cfg.sparse_attention, "train.indexer_stage", stage,
         "it trains a lightning indexer: give the model index_n_heads, index_head_dim and index_topk, or use ''.")
    need(not stage or "parallel" not in config or config.parallel.stage == 1, "train.indexer_stage", stage,
         "the pipelined step does not carry the indexer's loss yet: train the indexer with parallel.stage=1.")
    recipe_for(config)  # Builds the FP8 recipe if enabled: a bad recipe name or dtype fails here.
    if config.data.tokenizer == "byte" and cfg.vocab_size < 258:
        raise ValueError(f"config.model.vocab_size={cfg.vocab_size} is too small for the byte tokenizer "
                         "(ids up to 257): use at least 258, e.g. 264.")
    if config.data.tokenizer != "byte":
        ids = make_tokenizer(config.data).vocab_size
        if cfg.vocab_size < ids:  # the embedding lookup would clamp the ids beyond it without a word
            raise ValueError(f"config.model.vocab_size={cfg.vocab_size} is smaller than data.tokenizer's {ids} ids: "
                             f"use at least {ids}, e.g. {padded_vocab_size(ids)} (a multiple of 128, as DeepSeek's "
                             "configs pad it).")
    if config.data.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} exceeds config.model."
                         f"max_position_embeddings={cfg.max_position_embeddings}: shorten the rows.")
    return cfg
