"""Weights to generate with: a training run's orbax checkpoint (params or their EMA), or a Hugging Face one."""

from __future__ import annotations

import os

import jax
import ml_collections

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.validation import validate_run_config


def load_trained(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
                 use_ema: bool = False) -> tuple[ModelConfig, dict, int]:
    """(model config, variables {'params', 'routing'}, step) of `workdir/checkpoints` (latest unless `step`).

    Raises CheckpointError (a ValueError) when there is no such checkpoint, it holds no EMA although
    `use_ema`, or it was written by a different model than `config.model`.
    """
    cfg = validate_run_config(config)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise checkpoint_lib.CheckpointError(
            f"{directory} does not exist: train first (python -m deepseek_jax.train --config=... "
            f"--workdir={workdir}) or point --workdir at a training run.")
    ckpt = checkpoint_lib.Checkpointer(directory, keep=config.checkpoint.keep, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise checkpoint_lib.CheckpointError(f"no checkpoint in {directory}; train first.")
        if use_ema and not os.path.isdir(os.path.join(ckpt.path(step), "ema")):
            raise checkpoint_lib.CheckpointError(
                f"checkpoint {ckpt.path(step)} holds no EMA (train.ema_decay was 0): drop --use_ema.")
        state_like = jax.eval_shape(lambda: step_lib.init_state(cfg, make_optimizer(config.train),
                                                                jax.random.key(0)))
        restored = ckpt.restore(step, state_like, ema_like=state_like.params if use_ema else None,
                                model_config=cfg)
    finally:
        ckpt.close()
    state = restored["state"]
    params = restored["ema"] if use_ema else state.params
    return cfg, {"params": params, "routing": state.routing}, step
