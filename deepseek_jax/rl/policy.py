"""The starting policy (also the frozen reference): random, or the weights at `config.rl.init_from`."""

from __future__ import annotations

import jax
import ml_collections

from deepseek_jax import model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train.weights import load_weights


def load_policy(config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple[dict, str]:
    """(variables {'params', 'routing'}, a description of where they came from) for `config.rl.init_from`:
    a training run's checkpoint (its EMA with rl.init_use_ema) or a converted checkpoint (train/weights.py).

    The checkpoint's model must be `config.model` (CheckpointError listing the differing fields otherwise).
    """
    path = config.rl.init_from
    if not path:
        return model.init(cfg, jax.random.key(config.seed)), f"random init (seed {config.seed})"
    weights = load_weights(path, cfg, optimizer_cfg=config.train, use_ema=config.rl.init_use_ema,
                           field="config.rl.init_from")
    return weights.variables, weights.source
