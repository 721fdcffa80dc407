"""Trains a DeepSeek-V3-style model.

    python -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=...]
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")


def main(argv: list[str]) -> None:
    del argv
    print(f"JAX devices: {jax.devices()}")
    logging.set_verbosity(logging.WARNING)  # Keep orbax's per-save INFO lines out of the progress view.
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
