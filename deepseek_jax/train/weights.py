"""One weight loader: a training run's checkpoint, a converted Hugging Face checkpoint, or a Hugging Face
checkpoint directory, onto any mesh.

    weights = load_weights(path, cfg, optimizer_cfg=config.train, mesh=mesh, rules=rules)
    weights.variables   {'params', 'routing'} in the run's shardings on `mesh` (default: one device)

What `path` is decides how it is read:
    <path>/checkpoints    a `python -m deepseek_jax.train` (or SFT / GRPO) workdir: its latest checkpoint
                          (or `step`), the params or their EMA (`use_ema`)
    <path>/hf_import      a `python -m deepseek_jax.convert` workdir
    <path>/config.json    a Hugging Face DeepSeek-V3/R1/V2 checkpoint itself (convert.load_checkpoint)
The checkpoint's model must be `cfg` (a CheckpointError lists every differing field; runtime fields such
as the dtype and the MoE dispatch may differ); with `cfg=None` an imported checkpoint's own config is used.
Used by `--config.train.init_from`, `python -m deepseek_jax.evaluate`, `python -m deepseek_jax.generate`
and `config.rl.init_from`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from jax.sharding import Mesh

from deepseek_jax import convert
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import placement
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class Weights:
    cfg: ModelConfig  # The run's model config (or the checkpoint's, when none was given).
    variables: dict  # {'params': ..., 'routing': ...}
    step: int | None  # The training step of a training checkpoint, None for an imported one.
    source: str  # Where they came from, for logs and summaries: "<path> step 7 (EMA)", "<path> (converted)".


def weights_kind(path: str, field: str = "path") -> str:
    """'train', 'converted' or 'hf' (see the module docstring); CheckpointError naming `field` otherwise."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "train"
    if os.path.isdir(os.path.join(path, convert.SUBDIR)):
        return "converted"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise checkpoint_lib.CheckpointError(
        f"{field}={path!r} is neither a training run ({os.path.join(path, 'checkpoints')} does not exist) nor a "
        f"converted checkpoint (no {convert.SUBDIR}/) nor a Hugging Face checkpoint (no config.json): point it at "
        "the workdir of python -m deepseek_jax.train or python -m deepseek_jax.convert, or at a checkpoint "
        "directory.")


def _from_training_run(path: str, cfg: ModelConfig, optimizer_cfg: ml_collections.ConfigDict, step: int | None,
                       use_ema: bool, mesh: Mesh | None, rules: mesh_lib.Rules | None) -> Weights:
    tx = make_optimizer(optimizer_cfg)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(path, "checkpoints"), keep=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise checkpoint_lib.CheckpointError(f"no checkpoint in {ckpt.directory}; train first.")
        if use_ema and not os.path.isdir(os.path.join(ckpt.path(step), "ema")):
            raise checkpoint_lib.CheckpointError(
                f"checkpoint {ckpt.path(step)} holds no EMA (train.ema_decay was 0): drop --use_ema.")
        like = jax.eval_shape(lambda: step_lib.init_state(cfg, tx, jax.random.key(0)))
        if mesh is not None:
            shardings = placement.state_shardings(cfg, tx, mesh, rules)
            like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings)
        restored = ckpt.restore(step, like, ema_like=like.params if use_ema else None, model_config=cfg)
    finally:
        ckpt.close()
    state = restored["state"]
    params = restored["ema"] if use_ema else state.params
    return Weights(cfg, {"params": params, "routing": state.routing}, step,
                   f"{path} step {step}" + (" (EMA)" if use_ema else ""))


def load_weights(path: str, cfg: ModelConfig | None, *, optimizer_cfg: ml_collections.ConfigDict | None = None,
                 step: int | None = None, use_ema: bool = False, mesh: Mesh | None = None,
                 rules: mesh_lib.Rules | None = None, field: str = "path") -> Weights:
    """The weights at `path` (module docstring) for model `cfg`, placed by the run's `rules` on `mesh`.

    `optimizer_cfg` (the `train` group) describes the optimizer state a training checkpoint holds beside
    the weights; `field` names the setting `path` came from in errors (e.g. 'rl.init_from').
    """
    kind = weights_kind(path, field)
    if kind == "train":
        if cfg is None or optimizer_cfg is None:
            raise ValueError(f"{field}={path!r} is a training run: reading it needs the run config it was trained "
                             "with (--config).")
        return _from_training_run(path, cfg, optimizer_cfg, step, use_ema, mesh, rules)
    if use_ema or step is not None:
        raise checkpoint_lib.CheckpointError(
            f"{field}={path!r} is an imported checkpoint: it has no training steps and no EMA; drop "
            "the step / use_ema setting.")
    if mesh is not None and cfg is None:
        raise ValueError("placing imported weights on a mesh needs the run's model config (cfg).")
    variable_shardings = None if mesh is None else placement.variable_shardings(cfg, mesh, rules)
    if kind == "converted":
        saved_cfg, variables = convert.load_workdir(path, shardings=variable_shardings)
    else:
        saved_cfg, variables = convert.load_checkpoint(path, shardings=variable_shardings)
    if cfg is not None:
        checkpoint_lib.check_model_config(saved_cfg.to_dict(), cfg, path)
    return Weights(cfg or saved_cfg, variables, None, f"{path} (converted)" if kind == "converted" else path)
