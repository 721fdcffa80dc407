"""Checkpoints with orbax: train state, host EMA, data iterator state and the run's model config.

Each save is written to a temporary directory and renamed when complete (orbax's atomic commit), so an
interrupted save leaves the latest good checkpoint untouched; leftovers are cleaned at start-up. On
restore the saved model config must equal the run's, and a damaged checkpoint is a clear error.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from deepseek_jax.model.config import RUNTIME_FIELDS, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged or from a different model."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores {state, ema, data, meta} under `directory/<step>/`."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, ema: Any, data_state: dict, model_config: ModelConfig,
             force: bool = False) -> bool:
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state),
            "meta": ocp.args.JsonSave({"model": model_config.to_dict(), "step": int(step)}),
        }
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(self, step: int, state_like: Any, *, ema_like: Any, model_config: ModelConfig) -> dict:
        """{'state', 'ema', 'data'} of `step`, restored into the shapes/shardings of the templates."""
        check_model_config(self.restore_meta(step)["model"], model_config, self.path(step))
        items = {"state": ocp.args.StandardRestore(_abstract(state_like)), "data": ocp.args.JsonRestore()}
        if ema_like is not None:
            items["ema"] = ocp.args.StandardRestore(_abstract(ema_like))
        restored = self._restore(step, **items)
        return {"state": restored["state"], "ema": restored.get("ema"), "data": restored["data"]}

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _restore(self, step: int, **items) -> dict:
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(found steps {self.all_steps()}).")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files.
            raise CheckpointError(
                f"checkpoint {self.path(step)} is damaged or incomplete ({type(e).__name__}: {e}). "
                "Delete that step's directory to resume from an earlier one, or start a new workdir.") from e
        return dict(restored.items())

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_model_config(saved: dict, current: ModelConfig, where: str) -> None:
    """Raises CheckpointError listing every model field that differs from the saved one."""
    now = current.to_dict()
    diffs = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
             if k not in RUNTIME_FIELDS and saved.get(k) != now.get(k)}
    if diffs:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint {where} was written by a different model ({lines}). "
                              "Use the config it was trained with, or a new workdir.")
