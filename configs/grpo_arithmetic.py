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
    # 2 layers (1 dense + 1 MoE with 8 routed experts) instead of tiny's 4: on 2 CPU cores it trains ~3x
    # faster per step and learned the task per step no slower than 4 layers in our probes.
    config.model.num_hidden_layers = 2
    config.model.max_position_embeddings = 128
    config.data.seq_len = 128  # Unused (the jobs read the task, not a corpus); only data.tokenizer matters.
    rl = config.rl
    rl.task.update(kind="arithmetic", digits=2, operations="+", num_eval=1000)
    rl.max_prompt_tokens = 6  # "99+99=".
    rl.max_new_tokens = 40  # "<think>1819</think><answer>198</answer>" is 39 bytes, then the end token.
    # Demonstrations are the scarce resource: the warm start sees 200 worked solutions (passes over them),
    # GRPO fresh prompts with answers only. SFT memorises the 200 and then generalises only as far as they
    # cover the column facts (units digits; tens digits with the carry), so which 200 are drawn matters:
    # with this seed the warm start reaches 26% held-out at 1600 steps and continuing it gains nothing
    # (experiments/results/grpo_arithmetic.json); another draw reached 70% (grpo_arithmetic_0ffa9fc.json).
    rl.sft.update(steps=1600, batch_size=32, num_examples=200, learning_rate=2e-3, warmup_steps=20, eval_every=200)
    rl.prompts_per_step = 16
    rl.group_size = 8  # 128 rollouts per step.
    rl.updates_per_batch = 1  # On-policy: no old-policy pass; the compute goes into more prompts instead.
    rl.temperature = 1.0
    rl.kl_beta = 0.04
    rl.rewards = ml_collections.ConfigDict({"accuracy": 1.0, "format": 0.1})
    rl.eval_every = 25
    t = config.train
    t.steps = 250  # ~1.7 s each on 2 cores; still climbing at 250, but the experiment must fit in 30 minutes.
    t.learning_rate = 5e-4  # A quarter of the warm start's rate (the policy is small and still learning).
    t.warmup_steps = 5
    config.checkpoint.every = 50
    return config
