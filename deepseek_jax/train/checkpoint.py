"""Checkpoints with orbax: train state, host EMA, data iterator state and the run's model config.

Each save is written to a temporary directory and renamed when complete (orbax's atomic commit), so an
interrupted save leaves the latest good checkpoint untouched; leftovers are cleaned at start-up. On
restore the saved model config must equal the run's, and a damaged checkpoint is a clear error.

Every save also records, in its metadata, a digest of every array of the state and the EMA and of the
data iterator's state, computed from the arrays being saved (train/digest.py); restore recomputes them
from what it read and refuses a checkpoint whose bytes changed after the save (a `CheckpointError`
naming the step, the arrays, and the latest earlier step that still verifies). Checkpoints written
before digests were recorded restore with a warning.

A save may also record the run fields that decide what a resumed run computes (`resume_fields`: the data
stream, the batch shape, the optimizer); a restore given the run's current values refuses any that differ,
unless the run names them in `checkpoint.allow_changes`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Collection
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from deepseek_jax.model.config import RUNTIME_FIELDS, ModelConfig
from deepseek_jax.train import digest


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged or from a different model."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores {state, ema, data, meta} under `directory/<step>/`. `digests`: record them at
    each save and verify them at restore (module docstring); False only to measure what they cost
    (experiments/bench_checkpoint.py)."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True, digests: bool = True):
        self.directory = os.path.abspath(directory)
        self.digests = digests
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, ema: Any, data_state: dict, model_config: ModelConfig,
             run_fields: dict | None = None, force: bool = False) -> bool:
        """Saves `step` (in the background with async_save); `run_fields` = `resume_fields(config)`."""
        meta = {"model": model_config.to_dict(), "step": int(step)}
        if run_fields is not None:
            meta["run"] = run_fields
        if self.digests:
            meta["digests"] = {"state": digest.tree_digests(state), "data": digest.json_digest(data_state)}
            if ema is not None:
                meta["digests"]["ema"] = digest.tree_digests(ema)
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state),
                 "meta": ocp.args.JsonSave(meta)}
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema)
        self._raising_save_errors(None, self._manager.check_for_errors)  # an earlier background save's
        return self._raising_save_errors(step, self._manager.save, step, args=ocp.args.Composite(**items),
                                         force=force)

    def wait(self) -> None:
        """Until every save in progress is written (raises CheckpointError if one failed)."""
        self._raising_save_errors(None, self._manager.wait_until_finished)

    def _raising_save_errors(self, step: int | None, call, *args, **kwargs):
        """`call(...)`; a failure to write is a CheckpointError naming the path, the cause and the last
        committed checkpoint, raised after the manager's threads are stopped (so nothing blocks exit)."""
        try:
            return call(*args, **kwargs)
        except Exception as e:  # orbax/tensorstore raise many types for I/O failures.
            self._abandon()
            where = self.path(step) if step is not None else f"a checkpoint under {self.directory}"
            raise CheckpointError(
                f"could not save {where}: {_cause(e)}. The run stops here; {self.last_committed()}. Free space on "
                "that disk or fix the directory's permissions, then run the same command to resume.") from e

    def last_committed(self) -> str:
        """Which checkpoint a resume would start from, as a clause: read from the directory, so it holds
        after a failed save too (a save in progress is a temporary directory until it commits)."""
        committed = sorted(int(name) for name in os.listdir(self.directory) if name.isdigit()) \
            if os.path.isdir(self.directory) else []
        if not committed:
            return "no checkpoint was committed yet"
        return f"the last committed checkpoint is {self.path(committed[-1])}, untouched"

    def _abandon(self) -> None:
        """Stops the manager after a failed save, ignoring what else fails on the way."""
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001  the save already failed; this only releases threads
            logging.debug("closing the checkpoint manager after a failed save also failed", exc_info=True)
        self._closed = True

    def restore_meta(self, step: int) -> dict:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(self, step: int, state_like: Any, *, ema_like: Any, model_config: ModelConfig,
                run_fields: dict | None = None, allow_changes: Collection[str] = ()) -> dict:
        """{'state', 'ema', 'data'} of `step`, restored into the shapes/shardings of the templates and
        verified against the digests recorded at the save (module docstring). With `run_fields`, the saved
        ones must equal them except the fields named in `allow_changes`."""
        meta = self.restore_meta(step)
        check_model_config(meta["model"], model_config, self.path(step))
        if run_fields is not None and "run" in meta:
            check_resume_fields(meta["run"], run_fields, allow_changes, self.path(step))
        restored = self._read(step, state_like, ema_like)
        damaged = self._damaged(meta, restored) if self.digests else []
        if damaged:
            intact = next((s for s in sorted(self.all_steps(), reverse=True)
                           if s < step and self._verifies(s, state_like, ema_like)), None)
            shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
            fix = (f"Step {intact} is intact: delete {self.path(step)} (and any later step) to resume from it"
                   if intact is not None else "No earlier step verifies: start a new workdir")
            raise CheckpointError(
                f"checkpoint {self.path(step)} does not match the digests recorded when it was saved: "
                f"{shown} changed on disk after the save. {fix}.")
        return restored

    def _read(self, step: int, state_like: Any, ema_like: Any) -> dict:
        items = {"state": ocp.args.StandardRestore(_abstract(state_like)), "data": ocp.args.JsonRestore()}
        if ema_like is not None:
            items["ema"] = ocp.args.StandardRestore(_abstract(ema_like))
        restored = self._restore(step, **items)
        return {"state": restored["state"], "ema": restored.get("ema"), "data": restored["data"]}

    def _verifies(self, step: int, state_like: Any, ema_like: Any) -> bool:
        try:
            return not self._damaged(self.restore_meta(step), self._read(step, state_like, ema_like))
        except CheckpointError:
            return False

    def _damaged(self, meta: dict, restored: dict) -> list[str]:
        """What of `restored` differs from the digests in `meta` ('state', 'ema', 'data iterator' + paths)."""
        recorded = meta.get("digests")
        if recorded is None:
            logging.warning("checkpoint step %s records no digests (saved before they were added): restored "
                            "without verifying its bytes.", meta.get("step"))
            return []
        damaged = [f"state{p}" for p in digest.mismatched(restored["state"], recorded["state"])]
        if restored["ema"] is not None:
            damaged += [f"ema{p}" for p in digest.mismatched(restored["ema"], recorded.get("ema", {}))]
        if digest.json_digest(restored["data"]) != recorded["data"]:
            damaged.append("the data iterator's state")
        return damaged

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _restore(self, step: int, **items) -> dict:
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(found steps {self.all_steps()}).")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files.
            cause = f"{type(e).__name__}: {e}"
            if isinstance(e, json.JSONDecodeError):  # orbax does not say which of its JSON files it was
                cause = f"{unparsable_json_file(self.path(step))} is not valid JSON: {e}"
            raise CheckpointError(
                f"checkpoint {self.path(step)} is damaged or incomplete ({cause}). "
                "Delete that step's directory to resume from an earlier one, or start a new workdir.") from e
        return dict(restored.items())

    def close(self) -> None:
        """Waits for the saves in progress (CheckpointError if one failed) and stops the manager."""
        if self._closed:
            return
        self.wait()
        self._manager.close()
        self._closed = True


def unparsable_json_file(step_dir: str) -> str | None:
    """The first of a checkpoint's JSON files (orbax's metadata, the data iterator's and run's records) that
    does not parse; array data (`d/` folders) and OCDBT manifests are binary and skipped."""
    for root, dirs, files in os.walk(step_dir):
        dirs[:] = sorted(d for d in dirs if d != "d")
        for name in sorted(files):
            if name.endswith((".ocdbt", ".txt")):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    json.loads(f.read())
            except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
                return path
    return None


def close_quietly(checkpointer: Checkpointer) -> None:
    """Closes `checkpointer` while another error propagates: a save that fails meanwhile is logged,
    not raised over it."""
    try:
        checkpointer.close()
    except CheckpointError as e:
        logging.error("%s", e)


def _cause(error: BaseException) -> str:
    """The innermost message of a chain of exceptions, on one line; for tensorstore's failed writes, the
    operating system's reason and the file (e.g. 'File too large [os_error_code='27'] writing /x/d/1f')."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    failed = re.search(r'Failed writing: "([^"]+)": .*?: ([^:]*\[os_error_code=[^\]]*\])', text)
    if failed:
        return f"{failed.group(2).strip()} writing {failed.group(1)}"
    return f"{type(error).__name__}: {text}"[:600]


# The run-config fields that decide what a resumed pretraining run computes: its data stream, its batches'
# shape and its optimizer. (train.steps is not one: extending a run is what resuming is for; the schedule
# stretches.) The RL jobs name theirs in rl/config.py.
OPTIMIZER_FIELDS = ("train.learning_rate", "train.warmup_steps", "train.decay_start", "train.final_lr_fraction",
                    "train.b1", "train.b2", "train.eps", "train.weight_decay", "train.clip_norm", "train.moment_dtype")
RESUME_FIELDS = ("data.source", "data.path", "data.text_field", "data.tokenizer", "data.seq_len", "data.batch_size",
                 "data.seed", "data.shuffle_rows", "data.num_epochs", "data.num_workers", *OPTIMIZER_FIELDS,
                 "train.indexer_stage")


def resume_fields(config: ml_collections.ConfigDict, names: Collection[str] = RESUME_FIELDS) -> dict:
    """{'data.batch_size': 8, ...}: the run's values of the fields `names` (dotted paths; a group's value is
    its dict), as saved with each checkpoint."""
    values = {}
    for name in names:
        value = config
        for key in name.split("."):
            value = value[key]
        values[name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return values


def parse_allow_changes(text: str, names: Collection[str] = RESUME_FIELDS) -> list[str]:
    """The field names of `checkpoint.allow_changes`; raises ValueError naming one that is not in `names`
    (the fields checked on resume)."""
    allowed = [n.strip() for n in text.split(",") if n.strip()]
    for name in allowed:
        if name not in names:
            raise ValueError(f"checkpoint.allow_changes names {name!r}, which is not checked on resume; name "
                             f"fields of {', '.join(names)}.")
    return allowed


def check_resume_fields(saved: dict, current: dict, allow_changes: Collection[str], where: str) -> None:
    """Raises CheckpointError listing every field of `current` that differs from `saved` and is not in
    `allow_changes`, with both values and the flag that allows the change."""
    changed = [k for k in current if k in saved and saved[k] != current[k] and k not in allow_changes]
    if changed:
        lines = ", ".join(f"{k}: checkpoint {saved[k]!r} vs config {current[k]!r}" for k in changed)
        raise CheckpointError(
            f"resuming {where} with a different run ({lines}). Use the values it was trained with, a new "
            f"workdir, or, if the change is intended, --config.checkpoint.allow_changes={','.join(changed)}.")


def check_model_config(saved: dict, current: ModelConfig, where: str) -> None:
    """Raises CheckpointError listing every model field that differs from the saved one."""
    now = current.to_dict()
    # A field added to ModelConfig after the save (e.g. V3.2's index_topk) had its default value then.
    saved = {**{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING},
             **saved}
    diffs = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
             if k not in RUNTIME_FIELDS and saved.get(k) != now.get(k)}
    if diffs:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint {where} was written by a different model ({lines}). "
                              "Use the config it was trained with, or a new workdir.")
