"""The training job: `train_and_evaluate(config, workdir)`.

Builds the state (or resumes it from the latest checkpoint in `workdir`), then loops: next batch,
jitted step, EMA update on the host, metrics of the previous step (read one step late so the device
never waits for the host), periodic validation (bits per byte), checkpoints, and on SIGTERM a final
checkpoint and a clean exit. Leaves in `workdir`: checkpoints/, tensorboard/, metrics.csv, loss.png,
config.json, summary.json.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from deepseek_jax.data import pipeline, tokenizers
from deepseek_jax.infer.uncached import generate_uncached
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.ema import HostEMA
from deepseek_jax.train.evaluation import evaluate, model_inputs
from deepseek_jax.train.metrics import MetricWriter, plot_losses
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.precision import matmul_for
from deepseek_jax.train.validation import validate_run_config


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many consecutive non-finite steps)."""


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (restored on exit)."""

    def __enter__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def sample_text(cfg: ModelConfig, variables: dict, data_cfg: ml_collections.ConfigDict, prompt: str,
                num_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
    """The model's continuation of `prompt` (greedy at temperature 0), decoded to text."""
    tokenizer = tokenizers.make_tokenizer(data_cfg)
    ids = np.asarray(tokenizer.encode(prompt), np.int32)[None, :]
    room = cfg.max_position_embeddings - ids.shape[1]
    out = generate_uncached(cfg, variables, jnp.asarray(ids), min(num_tokens, room), temperature=temperature,
                            key=jax.random.key(seed))
    return prompt + tokenizer.decode(np.asarray(out[0, ids.shape[1]:]))


class _Progress:
    """The progress bar and the host-side bookkeeping of one step's metrics."""

    def __init__(self, start: int, total: int, tokens_per_step: int):
        self.bar = tqdm.tqdm(initial=start, total=total, desc="train", unit="step", mininterval=1.0,
                             dynamic_ncols=True)
        self.tokens_per_step = tokens_per_step
        self.last_time = time.perf_counter()
        self.tokens_per_second = 0.0

    def tick(self, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.tokens_per_second = rate if not self.tokens_per_second else 0.9 * self.tokens_per_second + 0.1 * rate
        self.last_time = now
        postfix = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{self.tokens_per_second:,.0f}"}
        if "mtp_loss" in metrics:
            postfix["mtp"] = f"{metrics['mtp_loss']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)


def make_step(config: ml_collections.ConfigDict, cfg: ModelConfig, tx, matmul):
    """The (state, batch) -> (state, metrics) step: pipelined over `parallel.stage` ranks, or not."""
    p = config.parallel if "parallel" in config else None
    if p is not None and p.stage > 1:
        from deepseek_jax.parallel.pipeline import stages  # Local: only pipelined runs build a mesh.

        return stages.make_pipelined_step(cfg, config.train, tx, p.pipeline, p.stage, p.microbatches, matmul)
    return functools.partial(step_lib.train_step, cfg=cfg, train_cfg=config.train, tx=tx, matmul=matmul)


def start_from_converted(state: step_lib.TrainState, converted_workdir: str, cfg: ModelConfig,
                         tx) -> step_lib.TrainState:
    """The state with the weights (and balancing biases) of a converted checkpoint, fresh optimizer."""
    from deepseek_jax import convert  # Local: only fine-tuning runs need safetensors and the converter.

    saved_cfg, variables = convert.load_workdir(converted_workdir)
    checkpoint_lib.check_model_config(saved_cfg.to_dict(), cfg, converted_workdir)
    print(f"Starting from the converted checkpoint in {converted_workdir}.")
    return state.replace(params=variables["params"], routing=variables["routing"],
                         opt_state=jax.jit(tx.init)(variables["params"]))


def _to_host(metrics: dict) -> dict[str, float]:
    """Scalars as floats; a per-layer vector `name` becomes columns name_0, name_1, ..."""
    host = {}
    for name, value in jax.device_get(metrics).items():
        if np.ndim(value) == 0:
            host[name] = float(value)
        else:
            host.update({f"{name}_{i}": float(v) for i, v in enumerate(np.ravel(value))})
    return host


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints). Returns the run summary."""
    cfg = validate_run_config(config)
    t = config.train
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    tx = make_optimizer(t)
    state = step_lib.init_state(cfg, tx, jax.random.key(config.seed))
    ema = HostEMA(state.params, t.ema_decay) if t.ema_decay else None
    corpus = pipeline.load_corpus(config.data)
    train_iter = pipeline.make_train_iterator(config.data, corpus=corpus)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
    start = ckpt.latest_step() or 0
    if not start and t.init_from:
        state = start_from_converted(state, t.init_from, cfg, tx)
    if start:
        restored = ckpt.restore(start, state, ema_like=ema and ema.value(), model_config=cfg)
        state = restored["state"]
        train_iter.set_state(restored["data"])
        if ema:
            ema.restore(restored["ema"])
        print(f"Resumed from {ckpt.path(start)}.")

    matmul = matmul_for(config)
    step_fn = jax.jit(make_step(config, cfg, tx, matmul),
                      donate_argnums=() if ema else (0,))  # The EMA reads each step's params later.
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, cfg=cfg, matmul=matmul))
    writer = MetricWriter(workdir)
    def variables(s: step_lib.TrainState) -> dict:
        """The model variables for evaluation and sampling, which run un-pipelined on one device (a
        pipelined step leaves the state on its Explicit 'stage' mesh, where ragged_dot has no
        sharding rule)."""
        v = {"params": s.params, "routing": s.routing}
        return jax.device_put(v, jax.devices()[0]) if config.parallel.stage > 1 else v
    tokens_per_step = config.data.batch_size * config.data.seq_len
    summary = {"start_step": start}
    if start == 0:
        first = evaluate(cfg, variables(state), config.data, t.eval_batches, eval_fn, corpus)
        summary["initial_eval_bpb"] = first["bpb"]
        writer.write(0, {"eval_loss": first["loss"], "eval_bpb": first["bpb"]})

    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, state, ema=ema.value() if ema else None, data_state=train_iter.get_state(),
                  model_config=cfg, force=force)

    progress = _Progress(start, t.steps, tokens_per_step)
    pending, started = None, time.perf_counter()
    with _SigtermFlag() as sigterm:
        for step in range(start, t.steps):
            state, metrics = step_fn(state, model_inputs(next(train_iter)))
            if ema:
                ema.update(state.params)
            if pending is not None:
                _finish_step(*pending, progress, writer, t)
            pending = (step + 1, metrics)
            done = step + 1
            if done % t.eval_every == 0 or done == t.steps:
                _finish_step(*pending, progress, writer, t)
                pending = None
                result = evaluate(cfg, variables(state), config.data, t.eval_batches, eval_fn, corpus)
                writer.write(done, {"eval_loss": result["loss"], "eval_bpb": result["bpb"]})
                summary["final_eval_bpb"] = result["bpb"]
                progress.bar.write(f"step {done}: validation {result['bpb']:.3f} bits/byte")
            if done % config.checkpoint.every == 0 or done == t.steps or sigterm.raised:
                save(done, force=sigterm.raised)
            if sigterm.raised:
                progress.bar.write(f"SIGTERM: saved step {done} to {ckpt.path(done)}; exiting.")
                break
        if pending is not None:
            _finish_step(*pending, progress, writer, t)
    progress.bar.close()
    elapsed = time.perf_counter() - started
    ckpt.close()
    writer.close()
    plot_losses(writer.csv_path, os.path.join(workdir, "loss.png"), title=f"{workdir}")
    summary.update(steps=int(state.step), skipped_steps=int(state.skipped_steps), seconds=elapsed,
                   tokens_per_second=progress.tokens_per_second, interrupted=bool(sigterm.raised))
    if t.sample_tokens and not sigterm.raised:
        summary["sample"] = sample_text(cfg, variables(state), config.data, t.sample_prompt, t.sample_tokens,
                                        t.sample_temperature, config.seed)
        print(f"\n--- sample (temperature {t.sample_temperature}) ---\n{summary['sample']}\n---")
    if ema:
        ema.close()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _finish_step(step: int, metrics, progress: _Progress, writer: MetricWriter,
                 t: ml_collections.ConfigDict) -> None:
    """Host side of a finished step: NaN accounting, progress, metric rows."""
    host = _to_host(metrics)
    if not host["finite"]:
        logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row).", step,
                        int(host["bad_steps"]))
        if host["bad_steps"] >= t.max_bad_steps:
            raise TrainingStopped(
                f"{int(host['bad_steps'])} consecutive steps with a NaN/Inf loss or gradient (up to step "
                f"{step}); lower train.learning_rate or check the data. The last checkpoint is intact.")
    progress.tick(host)
    if step % t.log_every == 0:
        writer.write(step, {**{k: v for k, v in host.items() if k not in ("finite",)},
                            "tokens_per_second": progress.tokens_per_second})
