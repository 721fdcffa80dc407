"""GRPO on generated arithmetic with the tiny model (no MTP): the supervised warm start, then RL.

    python -m deepseek_jax.grpo --config=configs/grpo_arithmetic.py --workdir=runs/arith_sft --sft
    python -m deepseek_jax.grpo --config=configs/grpo_arithmetic.py --workdir=runs/arith_grpo \
        --config.rl.init_from=runs/arith_sft

Both stages share the model, the tokenizer and the task (config.rl.task, held-out prompts included);
the warm start reads `config.rl.sft`, GRPO the rest of `config.rl` and the optimizer in `config.train`.
Variant: `configs/grpo_arithmetic.py:dispatch=ragged` (the MoE dispatch; dense is faster on CPU here).
"""

import pathlib

import ml_collections

from deepseek_jax import defaults
from deepseek_jax.rl.config import grpo_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = defaults.parse_variant(arg, dispatch="dense")
    tiny = defaults.load_config(f"{pathlib.Path(__file__).with_name('tiny.py')}:mtp=0,dispatch={opts.dispatch}")
    config = grpo_base_config()
    config.model = tiny.model
    config.model.max_position_embeddings = 128
    config.data.seq_len = 128  # Unused (the jobs read the task, not a corpus); only data.tokenizer matters.
    rl = config.rl
    rl.task.update(kind="arithmetic", digits=2, operations="+", num_eval=1000)
    rl.max_prompt_tokens = 6  # "99+99=".
    rl.max_new_tokens = 40  # "<think>891</think><answer>198</answer>" is 38 bytes, then the end token.
    rl.prompts_per_step = 8
    rl.group_size = 8
    rl.updates_per_batch = 2
    rl.temperature = 1.0
    rl.kl_beta = 0.04
    rl.rewards = ml_collections.ConfigDict({"accuracy": 1.0, "format": 0.1})
    rl.eval_every = 10
    rl.sft.update(steps=2000, batch_size=16, learning_rate=3e-3, warmup_steps=20, eval_every=500)
    t = config.train
    t.steps = 60
    t.learning_rate = 1e-4
    t.warmup_steps = 3
    config.checkpoint.every = 20
    return config
