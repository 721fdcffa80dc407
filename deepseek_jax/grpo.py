"""Reinforcement learning with GRPO (group-relative advantages, rule-based rewards).

    python -m deepseek_jax.grpo --config=configs/grpo_arithmetic.py --workdir=runs/arith_sft --sft
    python -m deepseek_jax.grpo --config=configs/grpo_arithmetic.py --workdir=runs/arith_grpo \
        --config.rl.init_from=runs/arith_sft [--config.rl.loss_type=dapo --config.rl.kl_beta=0 ...]
    python -m deepseek_jax.grpo --config=configs/grpo_arithmetic.py --write_sft_data=runs/arith_sft.jsonl
        # solved training problems as jsonl, for a warm start with python -m deepseek_jax.train instead

--sft runs the supervised warm start on the task's worked solutions (config.rl.sft); without it, GRPO.

See deepseek_jax/rl/ and configs/grpo_arithmetic.py.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.rl import tasks
from deepseek_jax.rl.sft import train_sft
from deepseek_jax.rl.trainer import train_grpo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_WRITE_SFT = flags.DEFINE_string("write_sft_data", None, "Write solved training problems of the config's task "
                                 "to this jsonl (for python -m deepseek_jax.train) and exit.")
_SFT = flags.DEFINE_bool("sft", False, "Run the supervised warm start (config.rl.sft) instead of GRPO.")
_SFT_EXAMPLES = flags.DEFINE_integer("sft_examples", 20000, "Problems --write_sft_data writes.")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if _WRITE_SFT.value:
        task = tasks.make_task(config.rl.task, config.seed)
        tasks.write_sft_jsonl(task.train_examples(0, _SFT_EXAMPLES.value), _WRITE_SFT.value)
        print(f"Wrote {_SFT_EXAMPLES.value} solved problems to {_WRITE_SFT.value}.")
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (or --write_sft_data).")
    print(f"JAX devices: {jax.devices()}")
    logging.set_verbosity(logging.WARNING)  # Keep orbax's per-save INFO lines out of the progress view.
    (train_sft if _SFT.value else train_grpo)(config, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
