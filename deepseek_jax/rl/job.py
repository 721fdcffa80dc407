"""What the GRPO and the supervised jobs share: set-up, resume, held-out evaluation and the step loop.

A job starts its TrainState from `config.rl.init_from` (policy.py) or resumes it from the latest
checkpoint in `workdir/checkpoints`, then `run` calls the job's step function once per step, writing
each step's metrics row (TensorBoard + metrics.csv), greedy held-out accuracy every `eval_every` steps
(and at step 0 and the end), checkpoints every `checkpoint.every` steps, and on SIGTERM a checkpoint
and a clean exit. Checkpoints hold the trainer's TrainState, so either job's can start the other, and
`python -m deepseek_jax.generate` / `infer.checkpoints.load_trained` read them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from deepseek_jax.data import tokenizers
from deepseek_jax.rl import evaluation, policy, rollout, tasks
from deepseek_jax.rl.config import validate_rl_config
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.loop import TrainingStopped
from deepseek_jax.train.metrics import MetricWriter
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.validation import validate_run_config

StepFn = Callable[[int, step_lib.TrainState], tuple[step_lib.TrainState, dict[str, float]]]


class _Sigterm:
    """SIGTERM becomes a flag checked between steps (the previous handler is restored on exit)."""

    def __enter__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Job:
    """The state, task, tokenizer and outputs of one run in `workdir`.

    `optimizer_cfg` is the `train`-like group the optimizer is built from (steps counted in updates).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, optimizer_cfg: ml_collections.ConfigDict):
        self.cfg = validate_run_config(config)
        validate_rl_config(config)
        self.config, self.workdir, self.rl = config, workdir, config.rl
        self.tokenizer = tokenizers.make_tokenizer(config.data)
        self.task = tasks.make_task(self.rl.task, config.seed)
        rollout.encode_prompts(self.tokenizer, self.task.eval_examples, self.rl.max_prompt_tokens)  # Fail early.
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        self.tx = make_optimizer(optimizer_cfg)
        variables, self.source = policy.load_policy(config, self.cfg)
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
        state = step_lib.TrainState(
            step=zero(), params=variables["params"], opt_state=jax.jit(self.tx.init)(variables["params"]),
            routing=variables["routing"], bad_steps=zero(), skipped_steps=zero())
        # Committed to one device like every jitted step's output, so the first step compiles the same
        # program as the later ones (uncommitted inputs made XLA compile each step function twice).
        self.device = jax.local_devices()[0]
        self.state = jax.device_put(state, self.device)
        self.initial_variables = jax.device_put(variables, self.device)
        self.ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                                async_save=config.checkpoint.async_save)
        self.start = self.ckpt.latest_step() or 0
        if self.start:
            restored = self.ckpt.restore(self.start, self.state, ema_like=None, model_config=self.cfg)["state"]
            self.state = jax.device_put(restored, self.device)
            print(f"Resumed from {self.ckpt.path(self.start)} (started from {self.source}).")
        else:
            print(f"Starting from {self.source}.")
        self.writer = MetricWriter(workdir)
        self.summary: dict = {"start_step": self.start, "policy_source": self.source}

    def evaluate(self, state: step_lib.TrainState) -> float:
        """Greedy accuracy on the task's held-out prompts."""
        rl = self.rl
        correct, _ = evaluation.greedy_correct(
            self.cfg, {"params": state.params, "routing": state.routing}, self.tokenizer, self.task.eval_examples,
            max_prompt_tokens=rl.max_prompt_tokens, max_new_tokens=rl.max_new_tokens, batch_size=rl.eval_batch_size)
        return float(correct.mean())

    def run(self, step_fn: StepFn, *, steps: int, eval_every: int, log_every: int, name: str,
            postfix: Callable[[dict], dict[str, str]]) -> dict:
        """Steps start .. steps-1 of `step_fn`; returns the summary (also written to summary.json)."""
        if self.start == 0:
            self.summary["initial_eval_accuracy"] = self.evaluate(self.state)
            self.writer.write(0, {"eval_accuracy": self.summary["initial_eval_accuracy"]})
        bar = tqdm.tqdm(initial=self.start, total=steps, desc=name, unit="step", mininterval=1.0, dynamic_ncols=True)
        started, done = time.perf_counter(), self.start
        last_eval = self.summary.get("initial_eval_accuracy", float("nan"))
        with _Sigterm() as sigterm:
            for step in range(self.start, steps):
                tick = time.perf_counter()
                self.state, row = step_fn(step, self.state)
                done = step + 1
                row["step_seconds"] = time.perf_counter() - tick
                if done % eval_every == 0 or done == steps:
                    last_eval = row["eval_accuracy"] = self.evaluate(self.state)
                    self.summary["final_eval_accuracy"] = last_eval
                if done % log_every == 0 or "eval_accuracy" in row:
                    self.writer.write(done, row)
                bar.set_postfix({**postfix(row), "eval": f"{last_eval:.3f}"}, refresh=False)
                bar.update(1)
                if done % self.config.checkpoint.every == 0 or done == steps or sigterm.raised:
                    self.ckpt.save(done, self.state, ema=None, data_state={"step": done}, model_config=self.cfg,
                                   force=sigterm.raised)
                if sigterm.raised:
                    bar.write(f"SIGTERM: saved step {done} to {self.ckpt.path(done)}; exiting.")
                    break
        bar.close()
        self.ckpt.close()
        self.writer.close()
        self.summary.update(steps=done, seconds=time.perf_counter() - started, interrupted=bool(sigterm.raised))
        with open(os.path.join(self.workdir, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=2)
        return self.summary


def check_finite(metrics: dict, step: int, max_bad_steps: int) -> None:
    """Warns about an update the NaN guard skipped; raises TrainingStopped after `max_bad_steps` in a row."""
    if bool(metrics["finite"]):
        return
    logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row).", step,
                    int(metrics["bad_steps"]))
    if int(metrics["bad_steps"]) >= max_bad_steps:
        raise TrainingStopped(f"{int(metrics['bad_steps'])} consecutive non-finite updates (at step {step}); lower "
                              "the learning rate or check the rewards. The last checkpoint is intact.")
