"""The run loop every job shares: pretraining (train/pretrain.py), the supervised warm start and GRPO (rl/).

    loop = RunLoop(workdir, name="train", steps=..., eval_every=..., log_every=..., checkpoint_every=...,
                   max_bad_steps=...)
    summary = loop.run(start, step=..., evaluate=..., save=...)

For each step from `start` on, `step(i) -> metrics` advances the job's state. Its metrics may be device
arrays: they are read one step late (after the next step is dispatched), so the device never waits for
the host. Then, in this order:
  NaN accounting   a step whose 'finite' is false is reported; after `max_bad_steps` in a row
                   (the step's 'bad_steps') the run stops with TrainingStopped
  progress         a bar with the step, the job's `postfix` fields, tokens/s and the last evaluation
  metrics          a row of the step's scalars every `log_every` steps, to TensorBoard and metrics.csv
                   (train/metrics.py), a vector `x` as columns x_0, x_1, ...
  evaluation       every `eval_every` steps, at step 0 of a fresh run and at the end: `evaluate() ->
                   {name: float}`, written with the step's row and summarised as initial_/final_<name>
  checkpoint       every `checkpoint_every` steps, at the end and on SIGTERM: `save(step, force)`
  SIGTERM          the flag is checked between steps: save, say so, and return normally.
At the end the job's plots are drawn from metrics.csv. Only process 0 (`lead`) writes files and
prints; every process runs the loop (and its collectives) in the same order.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
import tqdm

from deepseek_jax.train.checkpoint import Checkpointer, close_quietly
from deepseek_jax.train.metrics import MetricWriter, write_whole
from deepseek_jax.train.placement import host_value


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many consecutive non-finite steps)."""


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (restored on exit)."""

    def __enter__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def host_scalars(metrics: dict) -> dict[str, float]:
    """Scalars as floats; a vector `name` becomes columns name_0, name_1, ..."""
    host = {}
    for name, value in metrics.items():
        value = host_value(value)
        if np.ndim(value) == 0:
            host[name] = float(value)
        else:
            host.update({f"{name}_{i}": float(v) for i, v in enumerate(np.ravel(value))})
    return host


def write_json(workdir: str, name: str, text: str) -> None:
    """`workdir/name` with `text` (the run's config.json or summary.json), whole or not at all."""
    write_whole(os.path.join(workdir, name), text)


def make_workdir(workdir: str) -> None:
    """Creates `workdir` (and its parents), or says plainly why it cannot be one."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except FileExistsError as e:
        raise ValueError(f"--workdir={workdir}: {e.filename} is a file, not a directory; pass a directory "
                         "(new or a run's).") from None
    except OSError as e:
        raise ValueError(f"--workdir={workdir}: cannot create {e.filename or workdir} ({e.strerror}); pass a "
                         "directory you can write to.") from None
    if not os.access(workdir, os.W_OK):
        raise ValueError(f"--workdir={workdir}: the directory is not writable; pass one you can write to.")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    write_json(workdir, "config.json", config.to_json_best_effort(indent=2))


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The run config `save_config` wrote in `workdir` (tuples come back as lists)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: {workdir} is not the workdir of a training run.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the run's launch config.") from None


StepFn = Callable[[int], dict]


class RunLoop:
    """The loop of one job in `workdir` (see the module docstring)."""

    def __init__(self, workdir: str, *, name: str, steps: int, eval_every: int, log_every: int,
                 checkpoint_every: int, max_bad_steps: int, tokens_per_step: int = 0, lead: bool = True,
                 plots: Sequence[Callable[[str], None]] = ()):
        self.workdir, self.name, self.steps = workdir, name, steps
        self.eval_every, self.log_every, self.checkpoint_every = eval_every, log_every, checkpoint_every
        self.max_bad_steps, self.tokens_per_step, self.lead, self.plots = max_bad_steps, tokens_per_step, lead, plots
        self.writer = MetricWriter(workdir, enabled=lead)

    def run(self, start: int, *, step: StepFn, evaluate: Callable[[], dict[str, float]],
            save: Callable[[int, bool], str], postfix: Callable[[dict[str, float]], dict[str, str]],
            describe_eval: Callable[[dict[str, float]], str], checkpointer: Checkpointer | None = None) -> dict:
        """Steps start .. steps-1. Returns the summary {start_step, steps, seconds, interrupted,
        initial_/final_<evaluation metric>, tokens_per_second if known} (the job writes summary.json).

        `postfix(host metrics)` gives the bar's fields; the bar also shows the first value of the last
        evaluation, and `describe_eval(evaluation)` is the line printed after each. `checkpointer`, the one
        `save` writes with: on an error it is closed before the error propagates (a NaN stop then says
        which checkpoint is committed).
        """
        self._postfix = postfix
        self.writer.forget_after(start)
        summary: dict = {"start_step": start}
        last_eval = {}
        if start == 0:
            last_eval = evaluate()
            summary.update({f"initial_{k}": v for k, v in last_eval.items()})
            self.writer.write(0, last_eval)
        bar = tqdm.tqdm(initial=start, total=self.steps, desc=self.name, unit="step", mininterval=1.0,
                        dynamic_ncols=True, disable=not self.lead)
        self._last_time, self._rate, self._last_eval = time.perf_counter(), 0.0, last_eval
        started = time.perf_counter()
        try:
            done, interrupted = self._steps(start, step, evaluate, save, describe_eval, bar, summary)
        except BaseException as e:
            # The saves in flight finish (or fail) and the checkpointer's threads stop before the error
            # propagates, so it is the last thing a user sees and nothing keeps the process alive.
            if checkpointer is not None:
                close_quietly(checkpointer)
                if isinstance(e, TrainingStopped):
                    raise TrainingStopped(f"{e} The run stops here; {checkpointer.last_committed()}.") from None
            raise
        finally:  # on errors too: the writer's thread must not outlive the run
            bar.close()
            self.writer.close()
        if self.lead:
            for plot in self.plots:
                plot(self.writer.csv_path)
        summary.update(steps=done, seconds=time.perf_counter() - started, interrupted=interrupted)
        if self.tokens_per_step:
            summary["tokens_per_second"] = self._rate
        return summary

    def _steps(self, start: int, step: StepFn, evaluate: Callable[[], dict[str, float]],
               save: Callable[[int, bool], str], describe_eval: Callable[[dict[str, float]], str],
               bar: tqdm.tqdm, summary: dict) -> tuple[int, bool]:
        """The steps, evaluations and saves of `run`: (steps done, interrupted by SIGTERM)."""
        pending, done = None, start
        with SigtermFlag() as sigterm:
            for i in range(start, self.steps):
                metrics = step(i)
                if pending is not None:
                    self._log(pending[0], self._account(*pending, bar))
                done = i + 1
                pending = (done, metrics)
                if done % self.eval_every == 0 or done == self.steps:
                    host = self._account(done, metrics, bar)
                    result = evaluate()
                    self._last_eval = result
                    self._log(done, host, result)
                    pending = None
                    summary.update({f"final_{k}": v for k, v in result.items()})
                    self._write(bar, f"step {done}: {describe_eval(result)}")
                if done % self.checkpoint_every == 0 or done == self.steps or sigterm.raised:
                    path = save(done, sigterm.raised)
                    if sigterm.raised:
                        self._write(bar, f"SIGTERM: saved step {done} to {path}; exiting.")
                        break
            if pending is not None:
                self._log(pending[0], self._account(*pending, bar))
        return done, bool(sigterm.raised)

    def _write(self, bar: tqdm.tqdm, line: str) -> None:
        if self.lead:
            bar.write(line)

    def _account(self, step: int, metrics: dict, bar: tqdm.tqdm) -> dict[str, float]:
        """Host side of a finished step: its metrics read, NaN accounting, timing, progress."""
        host = host_scalars(metrics)
        if "finite" in host and not host["finite"]:
            logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row).", step,
                            int(host["bad_steps"]))
            if host["bad_steps"] >= self.max_bad_steps:
                raise TrainingStopped(
                    f"{int(host['bad_steps'])} consecutive steps with a NaN/Inf loss or gradient (up to step "
                    f"{step}); lower the learning rate or check the data (or rewards).")
        now = time.perf_counter()
        host["step_seconds"] = now - self._last_time
        self._last_time = now
        shown = dict(self._postfix(host))
        if self.tokens_per_step:
            rate = self.tokens_per_step / max(host["step_seconds"], 1e-9)
            self._rate = rate if not self._rate else 0.9 * self._rate + 0.1 * rate
            host["tokens_per_second"] = self._rate
            shown["tok/s"] = f"{self._rate:,.0f}"
        if self._last_eval:
            shown["eval"] = f"{next(iter(self._last_eval.values())):.3f}"
        bar.set_postfix(shown, refresh=False)
        bar.update(1)
        return host

    def _log(self, step: int, host: dict[str, float], evaluation: dict[str, float] | None = None) -> None:
        """The step's metrics row (every `log_every` steps, and with every evaluation)."""
        if step % self.log_every == 0 or evaluation is not None:
            self.writer.write(step, {**{k: v for k, v in host.items() if k != "finite"}, **(evaluation or {})})
