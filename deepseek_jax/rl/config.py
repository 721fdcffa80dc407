"""`config.rl`: GRPO's keys, their defaults, and start-up validation (each error names the field and the fix).

A GRPO config is `grpo_base_config()` (all of defaults.base_config() plus `rl`) with the model filled
in. The trainer's groups keep their meaning where GRPO uses them: `train` holds the optimizer
(learning rate and its schedule, betas, weight decay, clipping), with `train.steps` and
`train.warmup_steps` counted in GRPO steps (batches of rollouts; `optimizer_config` stretches the
schedule over their `updates_per_batch` updates each), `train.log_every`, `train.max_bad_steps` and
`train.bias_update_speed`; `checkpoint` as in training; `data.tokenizer` picks the tokenizer.
"""

from __future__ import annotations

import math

import ml_collections

from deepseek_jax import defaults
from deepseek_jax.checks import is_int, need
from deepseek_jax.rl.objective import LOSS_TYPES, LossSettings
from deepseek_jax.train.checkpoint import OPTIMIZER_FIELDS, parse_allow_changes

# The config fields that decide what a resumed job computes (train/checkpoint.py's resume_fields): a resume
# that changes one is refused unless checkpoint.allow_changes names it. The supervised job's optimizer is
# train's but for its schedule, which rl.sft sets.
_COMMON_RESUME_FIELDS = ("seed", "data.tokenizer", "rl.init_from", "rl.init_use_ema", "rl.task",
                         "rl.max_prompt_tokens", "rl.max_new_tokens")
GRPO_RESUME_FIELDS = (*_COMMON_RESUME_FIELDS, "rl.prompts_per_step", "rl.group_size", "rl.updates_per_batch",
                      "rl.temperature", "rl.loss_type", "rl.clip_low", "rl.clip_high", "rl.kl_beta", "rl.adv_eps",
                      "rl.rewards", "rl.reward_modules", *OPTIMIZER_FIELDS)
SFT_RESUME_FIELDS = (*_COMMON_RESUME_FIELDS, "rl.sft.batch_size", "rl.sft.num_examples", "rl.sft.learning_rate",
                     "rl.sft.warmup_steps", "train.b1", "train.b2", "train.eps", "train.weight_decay",
                     "train.clip_norm", "train.moment_dtype")
RL_RESUME_FIELDS = tuple(dict.fromkeys(GRPO_RESUME_FIELDS + SFT_RESUME_FIELDS))  # what allow_changes may name


def task_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "arithmetic"  # 'arithmetic' (generated from config.seed) or 'jsonl' (train_path / eval_path).
    c.digits = 3  # arithmetic: operands below 10**digits.
    c.operations = "+-"  # arithmetic: '+', '-' or both.
    c.num_eval = 1000  # Held-out prompts for greedy accuracy (jsonl: the first num_eval of eval_path; 0 = all).
    c.num_test = 0  # arithmetic: test prompts after the held-out ones, read by no job (experiments' final report).
    c.train_path = ""  # jsonl: {"prompt": ..., "answer": ...} lines to train on.
    c.eval_path = ""  # jsonl: held-out lines, same form.
    return c


def sft_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()  # The supervised warm start (python -m deepseek_jax.grpo --sft), rl/sft.py.
    c.steps = 2000  # Optimizer steps.
    c.batch_size = 16  # Worked examples per step.
    c.num_examples = 0  # Train on passes over this many worked examples; 0 = a fresh stream (unlimited).
    c.learning_rate = 3e-3  # After a linear warmup, constant (a resumed run continues at this rate).
    c.warmup_steps = 20
    c.eval_every = 500  # Steps between greedy held-out accuracy passes (also at step 0 and the end).
    return c


def rl_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The starting policy, also the frozen reference: a training run's workdir (python -m deepseek_jax.train;
    # its latest checkpoint) or a converted Hugging Face checkpoint's (python -m deepseek_jax.convert).
    # '' = random weights from config.seed (only useful for tests).
    c.init_from = ""
    c.init_use_ema = False  # Start from the training run's EMA of the params instead of the params.
    c.task = task_config()
    c.prompts_per_step = 8  # Prompts per batch of rollouts.
    c.group_size = 8  # G: completions sampled per prompt.
    c.updates_per_batch = 2  # mu: optimizer updates on each batch of rollouts (the ratio matters from the 2nd).
    c.max_prompt_tokens = 16  # S: prompts are right-padded to this width (a longer prompt is an error).
    c.max_new_tokens = 48  # M: generation budget per completion (also Dr. GRPO's length normaliser).
    c.temperature = 1.0  # Sampling temperature of the rollouts (log-probs use the same).
    # 'grpo' (per sequence, then per group), 'dapo' (per token), 'dr_grpo' (no std, constant length).
    c.loss_type = "grpo"
    c.clip_low = 0.2  # eps_low: the ratio is clipped to [1 - clip_low, 1 + clip_high] ...
    c.clip_high = 0.2  # ... (DAPO's clip-higher: 0.28).
    c.kl_beta = 0.04  # beta of the k3 KL to the reference (DeepSeekMath: 0.04); 0 = no reference kept.
    c.adv_eps = 1e-4  # Added to the group std in the advantage's denominator.
    c.rewards = ml_collections.ConfigDict({"accuracy": 1.0, "format": 0.1})  # Reward name -> weight.
    c.reward_modules = ""  # Comma-separated modules imported at start-up (they register more rewards).
    c.eval_every = 20  # GRPO steps between greedy held-out accuracy passes (also at step 0 and the end).
    c.eval_batch_size = 250  # Held-out prompts decoded together.
    c.sft = sft_config()
    return c


def grpo_base_config() -> ml_collections.ConfigDict:
    """defaults.base_config() plus `rl`, with training defaults suited to RL fine-tuning."""
    config = defaults.base_config()
    config.rl = rl_config()
    t = config.train
    t.steps = 100
    t.learning_rate = 1e-4
    t.warmup_steps = 5
    t.decay_start = 1.0  # Constant after warmup.
    t.weight_decay = 0.0
    t.ema_decay = 0.0  # Unused by GRPO.
    t.sample_tokens = 0
    t.log_every = 1
    config.checkpoint.every = 50
    return config


def optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.train` with steps and warmup counted in optimizer updates (GRPO steps x updates_per_batch)."""
    t = ml_collections.ConfigDict(config.train.to_dict())
    mu = config.rl.updates_per_batch
    t.steps, t.warmup_steps = config.train.steps * mu, config.train.warmup_steps * mu
    return t


def loss_settings(rl: ml_collections.ConfigDict) -> LossSettings:
    return LossSettings(loss_type=rl.loss_type, clip_low=float(rl.clip_low), clip_high=float(rl.clip_high),
                        kl_beta=float(rl.kl_beta), max_completion_tokens=int(rl.max_new_tokens),
                        adv_eps=float(rl.adv_eps))


def validate_rl_config(config: ml_collections.ConfigDict) -> None:
    """Checks `config.rl` (the rest is checked by train.validation.validate_run_config)."""
    if "rl" not in config:
        raise ValueError("config has no 'rl' group; build GRPO configs on deepseek_jax.rl.config.grpo_base_config().")
    rl = config.rl
    for name, group, defaults_ in (("rl", rl, rl_config()), ("rl.task", rl.get("task", {}), task_config()),
                                   ("rl.sft", rl.get("sft", {}), sft_config())):
        expected, present = set(defaults_.keys()), set(group.keys())
        need(expected == present, name, sorted(expected ^ present),
             f"unknown or missing keys; the keys are {sorted(expected)}.")
    for name in ("prompts_per_step", "updates_per_batch", "max_prompt_tokens", "max_new_tokens", "eval_every",
                 "eval_batch_size"):
        need(is_int(rl[name]) and rl[name] >= 1, f"rl.{name}", rl[name], "use an integer >= 1.")
    need(is_int(rl.group_size) and rl.group_size >= 2, "rl.group_size", rl.group_size,
         "GRPO's baseline is the group mean: sample at least 2 completions per prompt.")
    need(isinstance(rl.temperature, (int, float)) and math.isfinite(rl.temperature) and rl.temperature > 0,
         "rl.temperature", rl.temperature, "rollouts must be sampled: use a temperature > 0 (e.g. 1.0).")
    need(rl.loss_type in LOSS_TYPES, "rl.loss_type", rl.loss_type, f"use one of {LOSS_TYPES}.")
    for name in ("clip_low", "clip_high"):
        need(isinstance(rl[name], (int, float)) and rl[name] > 0, f"rl.{name}", rl[name],
             "use a positive clipping range, e.g. 0.2.")
    need(rl.clip_low < 1, "rl.clip_low", rl.clip_low, "use a value below 1 (the ratio's lower bound is 1 - clip_low).")
    need(isinstance(rl.kl_beta, (int, float)) and rl.kl_beta >= 0, "rl.kl_beta", rl.kl_beta,
         "use >= 0 (0 = no KL term and no reference model).")
    for name in ("steps", "batch_size", "eval_every"):
        need(is_int(rl.sft[name]) and rl.sft[name] >= 1, f"rl.sft.{name}", rl.sft[name], "use an integer >= 1.")
    need(is_int(rl.sft.num_examples) and rl.sft.num_examples >= 0, "rl.sft.num_examples", rl.sft.num_examples,
         "use an integer >= 0 (0 = a fresh stream of examples).")
    need(rl.sft.learning_rate > 0, "rl.sft.learning_rate", rl.sft.learning_rate, "use a positive learning rate.")
    need(is_int(rl.sft.warmup_steps) and 0 <= rl.sft.warmup_steps <= rl.sft.steps, "rl.sft.warmup_steps",
         rl.sft.warmup_steps, "use an integer between 0 and rl.sft.steps.")
    parse_allow_changes(config.checkpoint.allow_changes, RL_RESUME_FIELDS)
    need(isinstance(rl.adv_eps, (int, float)) and rl.adv_eps > 0, "rl.adv_eps", rl.adv_eps,
         "use a small positive number.")
    need(rl.task.kind in ("arithmetic", "jsonl"), "rl.task.kind", rl.task.kind, "use 'arithmetic' or 'jsonl'.")
    need(is_int(rl.task.num_eval) and rl.task.num_eval >= 0, "rl.task.num_eval", rl.task.num_eval,
         "use an integer >= 0.")
    need(is_int(rl.task.num_test) and rl.task.num_test >= 0, "rl.task.num_test", rl.task.num_test,
         "use an integer >= 0.")
    if rl.task.kind == "arithmetic":
        need(rl.task.num_eval >= 1, "rl.task.num_eval", rl.task.num_eval, "hold out at least one prompt.")
    else:
        need(rl.task.num_test == 0, "rl.task.num_test", rl.task.num_test,
             "jsonl tasks have no generated test split: set it to 0 and evaluate a test file of your own.")
    longest = rl.max_prompt_tokens + rl.max_new_tokens
    need(longest <= config.model.max_position_embeddings, "rl.max_new_tokens", rl.max_new_tokens,
         f"max_prompt_tokens + max_new_tokens = {longest} exceeds model.max_position_embeddings="
         f"{config.model.max_position_embeddings}.")
    p = config.parallel
    need((p.stage, p.data, p.expert, p.tensor) == (1, 1, 1, 1), "parallel", (p.stage, p.data, p.expert, p.tensor),
         "GRPO runs on one device for now: set parallel.stage/data/expert/tensor to 1.")
