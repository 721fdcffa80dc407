"""The starting policy (also the frozen reference): a training run's checkpoint or a converted HF checkpoint."""

from __future__ import annotations

import os

import jax
import ml_collections

from deepseek_jax import model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import checkpoint as checkpoint_lib


def source_kind(path: str) -> str:
    """'train' (a `python -m deepseek_jax.train` workdir), 'hf' (a `python -m deepseek_jax.convert` workdir)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "train"
    if os.path.isdir(os.path.join(path, "hf_import")):
        return "hf"
    raise ValueError(f"config.rl.init_from={path!r} is neither a training run (no {path}/checkpoints) nor a "
                     f"converted checkpoint (no {path}/hf_import): point it at the workdir of python -m "
                     "deepseek_jax.train or python -m deepseek_jax.convert.")


def load_policy(config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple[dict, str]:
    """(variables {'params', 'routing'}, a description of where they came from) for `config.rl.init_from`.

    The checkpoint's model must be `config.model` (CheckpointError listing the differing fields otherwise).
    """
    path = config.rl.init_from
    if not path:
        return model.init(cfg, jax.random.key(config.seed)), f"random init (seed {config.seed})"
    if source_kind(path) == "train":
        from deepseek_jax.infer import checkpoints  # Local: loading pulls in the trainer's state.

        _, variables, step = checkpoints.load_trained(config, path, use_ema=config.rl.init_use_ema)
        return variables, f"{path} step {step}" + (" (EMA)" if config.rl.init_use_ema else "")
    from deepseek_jax import convert  # Local: only HF starts need the converter.

    if config.rl.init_use_ema:
        raise ValueError(f"config.rl.init_use_ema=True but {path} is a converted checkpoint (no EMA): set it to False.")
    saved_cfg, variables = convert.load_workdir(path)
    checkpoint_lib.check_model_config(saved_cfg.to_dict(), cfg, path)
    return variables, f"{path} (converted)"
