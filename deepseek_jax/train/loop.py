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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax.data import pipeline, tokenizers
from deepseek_jax.infer.uncached import generate_uncached
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import placement
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.ema import HostEMA
from deepseek_jax.train.evaluation import evaluate
from deepseek_jax.train.metrics import MetricWriter, plot_losses
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.precision import matmul_for
from deepseek_jax.train.validation import training_model_config, validate_run_config


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

    def __init__(self, start: int, total: int, tokens_per_step: int, enabled: bool = True):
        self.bar = tqdm.tqdm(initial=start, total=total, desc="train", unit="step", mininterval=1.0,
                             dynamic_ncols=True, disable=not enabled)
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

    def write(self, line: str) -> None:
        if not self.bar.disable:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def make_step(config: ml_collections.ConfigDict, cfg: ModelConfig, tx, matmul, mesh=None):
    """The (state, batch) -> (state, metrics) step: pipelined over the `parallel.stage` ranks of `mesh`
    (data-parallel over its other axes), or not."""
    p = config.parallel if "parallel" in config else None
    if p is not None and p.stage > 1:
        from deepseek_jax.parallel.pipeline import stages  # Local: only pipelined runs need the executor.

        return stages.make_pipelined_step(cfg, config.train, tx, p.pipeline, p.stage, p.microbatches, matmul,
                                          mesh=mesh)
    return functools.partial(step_lib.train_step, cfg=cfg, train_cfg=config.train, tx=tx, matmul=matmul)


def start_from_converted(state: step_lib.TrainState, converted_workdir: str, cfg: ModelConfig,
                         tx) -> step_lib.TrainState:
    """The state with the weights (and balancing biases) of a converted checkpoint, fresh optimizer,
    laid out like `state`."""
    from deepseek_jax import convert  # Local: only fine-tuning runs need safetensors and the converter.

    saved_cfg, variables = convert.load_workdir(converted_workdir)
    checkpoint_lib.check_model_config(saved_cfg.to_dict(), cfg, converted_workdir)
    print(f"Starting from the converted checkpoint in {converted_workdir}.")
    shardings = jax.tree.map(lambda a: a.sharding, state)
    params = jax.device_put(jax.device_get(variables["params"]), shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state,
                         routing=jax.device_put(jax.device_get(variables["routing"]), shardings.routing))


def _to_host(metrics: dict) -> dict[str, float]:
    """Scalars as floats; a per-layer vector `name` becomes columns name_0, name_1, ..."""
    host = {}
    for name, value in metrics.items():
        value = placement.host_value(value)
        if np.ndim(value) == 0:
            host[name] = float(value)
        else:
            host.update({f"{name}_{i}": float(v) for i, v in enumerate(np.ravel(value))})
    return host


class _Placement:
    """The run's devices: the mesh of `config.parallel` (a pipeline's 'stage' axis included), the
    state's shardings, and moving batches and variables where the jitted functions want them."""

    def __init__(self, config: ml_collections.ConfigDict, cfg: ModelConfig, tx):
        self.mesh = mesh_lib.make_mesh(config.parallel)
        self.state_shardings = placement.state_shardings(cfg, tx, self.mesh)
        self.rows = mesh_lib.process_rows(config.data.batch_size)

    def context(self):
        """The mesh in context for tracing (the expert dispatch finds it there)."""
        return jax.set_mesh(self.mesh)

    def init_state(self, cfg: ModelConfig, tx, key: jax.Array) -> step_lib.TrainState:
        return placement.init_sharded_state(cfg, tx, key, self.mesh)

    def batch(self, batch: dict) -> dict:
        """This process's rows of a global data batch, as global arrays sharded over the batch axes."""
        inputs = {k: np.asarray(batch[k])[self.rows] for k in ("tokens", "segment_ids", "positions")}
        return mesh_lib.shard_batch(inputs, self.mesh)

    def jit_step(self, step, donate: bool):
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(step, in_shardings=(self.state_shardings, mesh_lib.batch_sharding(self.mesh)),
                       out_shardings=(self.state_shardings, replicated), donate_argnums=(0,) if donate else ())

    def jit_eval(self, eval_step):
        s = self.state_shardings
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(eval_step, in_shardings=(s.params, s.routing, mesh_lib.batch_sharding(self.mesh)),
                       out_shardings=replicated)

    def on_one_device(self, tree):
        """`tree` gathered onto this process's first device, for sampling (which runs un-sharded)."""
        if jax.process_count() > 1:
            tree = multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_put(tree, jax.local_devices()[0])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints). Returns the run summary.

    With several processes (`parallel/distributed.py`) every process runs this; process 0 alone writes
    the metrics, plots, config and summary, and all of them write their shards of each checkpoint.
    """
    cfg = training_model_config(config, validate_run_config(config))
    t = config.train
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    tx = make_optimizer(t)
    devices = _Placement(config, cfg, tx)
    state = devices.init_state(cfg, tx, jax.random.key(config.seed))
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
    step_fn = devices.jit_step(make_step(config, cfg, tx, matmul, devices.mesh),
                               donate=not ema)  # The EMA reads each step's params later.
    eval_cfg = cfg.replace(moe_capacity_factor=0.0)  # Validation never drops tokens.
    eval_fn = devices.jit_eval(functools.partial(step_lib.eval_step, cfg=eval_cfg, matmul=matmul))
    writer = MetricWriter(workdir, enabled=lead)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    summary = {"start_step": start}

    def validate(s: step_lib.TrainState) -> dict[str, float]:
        variables = {"params": s.params, "routing": s.routing}
        with devices.context():
            return evaluate(eval_cfg, variables, config.data, t.eval_batches, eval_fn, corpus, place=devices.batch)

    if start == 0:
        first = validate(state)
        summary["initial_eval_bpb"] = first["bpb"]
        writer.write(0, {"eval_loss": first["loss"], "eval_bpb": first["bpb"]})

    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, state, ema=ema.value() if ema else None, data_state=train_iter.get_state(),
                  model_config=cfg, force=force)

    progress = _Progress(start, t.steps, tokens_per_step, enabled=lead)
    pending, started = None, time.perf_counter()
    with SigtermFlag() as sigterm, devices.context():
        for step in range(start, t.steps):
            state, metrics = step_fn(state, devices.batch(next(train_iter)))
            if ema:
                ema.update(state.params)
            if pending is not None:
                _finish_step(*pending, progress, writer, t)
            pending = (step + 1, metrics)
            done = step + 1
            if done % t.eval_every == 0 or done == t.steps:
                _finish_step(*pending, progress, writer, t)
                pending = None
                result = validate(state)
                writer.write(done, {"eval_loss": result["loss"], "eval_bpb": result["bpb"]})
                summary["final_eval_bpb"] = result["bpb"]
                progress.write(f"step {done}: validation {result['bpb']:.3f} bits/byte")
            if done % config.checkpoint.every == 0 or done == t.steps or sigterm.raised:
                save(done, force=sigterm.raised)
            if sigterm.raised:
                progress.write(f"SIGTERM: saved step {done} to {ckpt.path(done)}; exiting.")
                break
        if pending is not None:
            _finish_step(*pending, progress, writer, t)
    progress.close()
    elapsed = time.perf_counter() - started
    ckpt.close()
    writer.close()
    summary.update(steps=int(placement.host_value(state.step)),
                   skipped_steps=int(placement.host_value(state.skipped_steps)),
                   seconds=elapsed, tokens_per_second=progress.tokens_per_second, interrupted=bool(sigterm.raised))
    if t.sample_tokens and not sigterm.raised:
        variables = devices.on_one_device({"params": state.params, "routing": state.routing})
        sample_cfg = eval_cfg.replace(moe_dispatch="ragged")  # One device: no expert parallelism.
        summary["sample"] = sample_text(sample_cfg, variables, config.data, t.sample_prompt, t.sample_tokens,
                                        t.sample_temperature, config.seed)
        if lead:
            print(f"\n--- sample (temperature {t.sample_temperature}) ---\n{summary['sample']}\n---")
    if ema:
        ema.close()
    if lead:
        plot_losses(writer.csv_path, os.path.join(workdir, "loss.png"), title=f"{workdir}")
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
