"""What the GRPO and the supervised jobs share: set-up, resume, held-out evaluation, and their run loop.

A job starts its TrainState from `config.rl.init_from` (policy.py) or resumes it from the latest
checkpoint in `workdir/checkpoints`, then `run` drives the shared run loop (train/loop.py) with the
job's step function: a metrics row per step (TensorBoard + metrics.csv), greedy held-out accuracy every
`eval_every` steps (and at step 0 and the end), checkpoints every `checkpoint.every` steps, NaN
accounting, and on SIGTERM a checkpoint and a clean exit. Checkpoints hold the trainer's TrainState, so
either job's can start the other, and `python -m deepseek_jax.generate` (train/weights.py) reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections

from deepseek_jax.data import tokenizers
from deepseek_jax.rl import evaluation, policy, rollout, tasks
from deepseek_jax.rl.config import RL_RESUME_FIELDS, validate_rl_config
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.loop import RunLoop, make_workdir, save_config, write_json
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.validation import validate_run_config

StepFn = Callable[[int, step_lib.TrainState], tuple[step_lib.TrainState, dict[str, float]]]


def finite_row(updates: Sequence[dict]) -> dict[str, float]:
    """The NaN accounting of a step that made these optimizer updates (their metrics, on the host): finite
    only if every update was, and the longest run of skipped updates it reached."""
    return {"finite": float(all(bool(u["finite"]) for u in updates)),
            "bad_steps": float(max(int(u["bad_steps"]) for u in updates))}


class Job:
    """The state, task, tokenizer and outputs of one run in `workdir`.

    `optimizer_cfg` is the `train`-like group the optimizer is built from (steps counted in updates);
    `resume_names` the config fields a resume must not change (rl/config.py's GRPO_ / SFT_RESUME_FIELDS).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, optimizer_cfg: ml_collections.ConfigDict,
                 resume_names: Sequence[str]):
        self.cfg = validate_run_config(config)
        validate_rl_config(config)
        self.config, self.workdir, self.rl = config, workdir, config.rl
        self.tokenizer = tokenizers.make_tokenizer(config.data)
        self.task = tasks.make_task(self.rl.task, config.seed)
        rollout.encode_prompts(self.tokenizer, self.task.eval_examples, self.rl.max_prompt_tokens)  # Fail early.
        make_workdir(workdir)
        self.tx = make_optimizer(optimizer_cfg)
        variables, self.source = policy.load_policy(config, self.cfg)
        # Committed to one device like every jitted step's output, so the first step compiles the same
        # program as the later ones (uncommitted inputs made XLA compile each step function twice).
        self.device = jax.local_devices()[0]
        self.state = jax.device_put(step_lib.state_from_variables(variables, self.tx), self.device)
        self.initial_variables = jax.device_put(variables, self.device)
        self.ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                                async_save=config.checkpoint.async_save)
        self.run_fields = checkpoint_lib.resume_fields(config, resume_names)
        self.start = self.ckpt.latest_step() or 0
        if self.start:
            allow = checkpoint_lib.parse_allow_changes(config.checkpoint.allow_changes, RL_RESUME_FIELDS)
            restored = self.ckpt.restore(self.start, self.state, ema_like=None, model_config=self.cfg,
                                         run_fields=self.run_fields, allow_changes=allow)["state"]
            self.state = jax.device_put(restored, self.device)
            print(f"Resumed from {self.ckpt.path(self.start)} (started from {self.source}).")
        else:
            print(f"Starting from {self.source}.")
        save_config(workdir, config)  # only now: a resume refused above leaves config.json as it was

    def evaluate(self, state: step_lib.TrainState) -> float:
        """Greedy accuracy on the task's held-out prompts."""
        rl = self.rl
        correct, _ = evaluation.greedy_correct(
            self.cfg, {"params": state.params, "routing": state.routing}, self.tokenizer, self.task.eval_examples,
            max_prompt_tokens=rl.max_prompt_tokens, max_new_tokens=rl.max_new_tokens, batch_size=rl.eval_batch_size)
        return float(correct.mean())

    def run(self, step_fn: StepFn, *, steps: int, eval_every: int, log_every: int, name: str,
            postfix: Callable[[dict], dict[str, str]], plots: Sequence[Callable[[str], None]] = ()) -> dict:
        """Steps start .. steps-1 of `step_fn`; returns the summary (also written to summary.json)."""

        def step(i: int) -> dict[str, float]:
            self.state, row = step_fn(i, self.state)
            return row

        def save(done: int, force: bool) -> str:
            self.ckpt.save(done, self.state, ema=None, data_state={"step": done}, model_config=self.cfg,
                           run_fields=self.run_fields, force=force)
            return self.ckpt.path(done)

        loop = RunLoop(self.workdir, name=name, steps=steps, eval_every=eval_every, log_every=log_every,
                       checkpoint_every=self.config.checkpoint.every, max_bad_steps=self.config.train.max_bad_steps,
                       plots=plots)
        summary = loop.run(self.start, step=step, evaluate=lambda: {"eval_accuracy": self.evaluate(self.state)},
                           save=save, postfix=postfix,
                           describe_eval=lambda r: f"held-out greedy accuracy {r['eval_accuracy']:.3f}",
                           checkpointer=self.ckpt)
        self.ckpt.close()
        summary = {"start_step": self.start, "policy_source": self.source, **summary}
        write_json(self.workdir, "summary.json", json.dumps(summary, indent=2))
        return summary
