"""GRPO on generated arithmetic with the tiny model (no MTP): the supervised warm start and the RL run.

    python -m deepseek_jax.grpo --config=configs/grpo_arithmetic.py --workdir=runs/arith_sft \
        --write_sft_data=runs/arith_sft.jsonl                                      # 1. solved problems
    python -m deepseek_jax.train --config=configs/grpo_arithmetic.py:stage=sft --workdir=runs/arith_sft \
        --config.data.path=runs/arith_sft.jsonl                                    # 2. SFT
    python -m deepseek_jax.grpo --config=configs/grpo_arithmetic.py --workdir=runs/arith_grpo \
        --config.rl.init_from=runs/arith_sft                                       # 3. GRPO

Both stages share the model, the tokenizer and the task (config.rl.task, held-out prompts included);
`stage=sft` sets `data` and `train` for the supervised run, the default `stage=grpo` for GRPO.
"""

import pathlib

import ml_collections

from deepseek_jax import defaults
from deepseek_jax.rl.config import grpo_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = defaults.parse_variant(arg, stage="grpo", dispatch="ragged")
    if opts.stage not in ("sft", "grpo"):
        raise ValueError(f"config argument stage={opts.stage!r}: use 'sft' or 'grpo'.")
    tiny = defaults.load_config(f"{pathlib.Path(__file__).with_name('tiny.py')}:mtp=0,dispatch={opts.dispatch}")
    config = grpo_base_config()
    config.model = tiny.model
    config.model.max_position_embeddings = 128
    rl = config.rl
    rl.task.update(kind="arithmetic", digits=3, operations="+-", num_eval=1000)
    rl.max_prompt_tokens = 8  # "999+999=".
    rl.max_new_tokens = 40  # "<think>8991</think><answer>1998</answer>" is 39 bytes, then the end token.
    rl.prompts_per_step = 8
    rl.group_size = 8
    rl.updates_per_batch = 2
    rl.temperature = 1.0
    rl.kl_beta = 0.04
    rl.rewards = ml_collections.ConfigDict({"accuracy": 1.0, "format": 0.1})
    rl.eval_every = 10
    t = config.train
    t.steps = 60
    t.learning_rate = 1e-4
    t.warmup_steps = 3
    config.checkpoint.every = 20
    # The supervised run reads solved problems (written by `python -m deepseek_jax.grpo --write_sft_data`).
    d = config.data
    d.update(source="files", path="runs/arith_sft.jsonl", text_field="text", seq_len=128, batch_size=16,
             validation_fraction=0.02, shuffle_rows=256)
    if opts.stage == "sft":
        t.update(steps=300, learning_rate=3e-3, warmup_steps=20, decay_start=1.0, weight_decay=0.1, ema_decay=0.0,
                 eval_every=100, eval_batches=4, log_every=10, sample_tokens=0)
        config.checkpoint.every = 100
    return config
