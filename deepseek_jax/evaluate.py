"""Validation loss and bits per byte of a training checkpoint (its params or its EMA).

    python -m deepseek_jax.evaluate --config=configs/tiny.py --workdir=runs/tiny [--use_ema] [--step=N]
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.train.evaluation import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "Evaluate the EMA of the params instead of the params.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    print(json.dumps(evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                                         use_ema=_USE_EMA.value)))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
