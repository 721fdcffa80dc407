"""The pretraining job: `train_and_evaluate(config, workdir)` (what `python -m deepseek_jax.train` runs).

Builds the state on the run's mesh (or resumes it from the latest checkpoint in `workdir`, or starts
from `train.init_from`'s weights), then runs the shared loop (train/loop.py): next batch, jitted step
(plain or pipelined), EMA update on the host, validation in bits per byte, checkpoints of the state,
the EMA and the data iterator, SIGTERM. Leaves in `workdir`: checkpoints/, tensorboard/, metrics.csv,
loss.png, config.json, summary.json, and prints a sample of the trained model.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax.data import pipeline
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import dispatch
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import placement
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.ema import HostEMA
from deepseek_jax.train.evaluation import evaluate
from deepseek_jax.train.loop import RunLoop, make_workdir, save_config, write_json
from deepseek_jax.train.metrics import plot_losses
from deepseek_jax.train.optimizer import INDEXER_STAGES, make_optimizer, trains_indexer_only
from deepseek_jax.train.pipelined import make_pipelined_step
from deepseek_jax.train.precision import recipe_for
from deepseek_jax.train.sample import sample_text
from deepseek_jax.train.validation import validate_run_config
from deepseek_jax.train.weights import load_weights


def make_step(config: ml_collections.ConfigDict, cfg: ModelConfig, tx, recipe, mesh=None):
    """The (state, batch) -> (state, metrics) step: pipelined over the `parallel.stage` ranks of `mesh`
    (data-parallel over its other axes), or not."""
    p = config.parallel if "parallel" in config else None
    if p is not None and p.stage > 1:
        return make_pipelined_step(cfg, config.train, tx, p.pipeline, p.stage, p.microbatches, recipe, mesh=mesh)
    return functools.partial(step_lib.train_step, cfg=cfg, train_cfg=config.train, tx=tx, recipe=recipe)


class Placement:
    """The run's devices: the mesh of `config.parallel` (a pipeline's 'stage' axis included), the
    state's shardings by the run's logical rules, and moving batches and variables where the jitted
    functions want them."""

    def __init__(self, config: ml_collections.ConfigDict, cfg: ModelConfig, tx):
        self.mesh = mesh_lib.make_mesh(config.parallel)
        self.rules = mesh_lib.run_rules(config.parallel)
        self.state_shardings = placement.state_shardings(cfg, tx, self.mesh, self.rules)
        self.rows = mesh_lib.process_rows(config.data.batch_size)

    def context(self):
        """The mesh in context for tracing (the expert dispatch finds it there)."""
        return jax.set_mesh(self.mesh)

    def init_state(self, cfg: ModelConfig, tx, key: jax.Array) -> step_lib.TrainState:
        return placement.init_sharded_state(cfg, tx, key, self.mesh, self.rules)

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


def _leaf_at(tree: dict, path: tuple, default):
    """tree's leaf at a key path, or `default` where the path does not exist in `tree`."""
    for key in path:
        if key.key not in tree:
            return default
        tree = tree[key.key]
    return tree


def start_from(state: step_lib.TrainState, config: ml_collections.ConfigDict, cfg: ModelConfig, tx,
               devices: Placement) -> step_lib.TrainState:
    """The state with the weights (and balancing biases) at `train.init_from`, a fresh optimizer state,
    laid out like `state`.

    Sparse attention's dense warm-up starts from a dense model (V3.2 continues V3.1's training): the weights
    are read as that model's, and the lightning indexers keep their fresh initialisation."""
    source_cfg = cfg
    if trains_indexer_only(config.train):
        source_cfg = cfg.dense_attention()
    weights = load_weights(config.train.init_from, source_cfg, optimizer_cfg=config.train, mesh=devices.mesh,
                           rules=devices.rules, field="config.train.init_from")
    print(f"Starting from {weights.source}" + (" (new lightning indexers)." if source_cfg is not cfg else "."))
    shardings = devices.state_shardings
    loaded = weights.variables["params"]
    if source_cfg is not cfg:  # Every leaf from the dense model, the indexers' from `state`.
        loaded = jax.tree_util.tree_map_with_path(
            lambda path, fresh: _leaf_at(loaded, path, fresh), state.params)
    params = jax.device_put(loaded, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state,
                         routing=jax.device_put(weights.variables["routing"], shardings.routing))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints). Returns the run summary.

    With several processes (`parallel/distributed.py`) every process runs this; process 0 alone writes
    the metrics, plots, config and summary, and all of them write their shards of each checkpoint.
    """
    cfg = dispatch.training_model_config(config, validate_run_config(config))
    cfg = cfg.replace(indexer_loss=INDEXER_STAGES[config.train.get("indexer_stage", "")])
    t = config.train
    lead = jax.process_index() == 0
    make_workdir(workdir)

    tx = make_optimizer(t)
    devices = Placement(config, cfg, tx)
    state = devices.init_state(cfg, tx, jax.random.key(config.seed))
    ema = HostEMA(state.params, t.ema_decay) if t.ema_decay else None
    corpus = pipeline.load_corpus(config.data)
    train_iter = pipeline.make_train_iterator(config.data, corpus=corpus)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
    start = ckpt.latest_step() or 0
    if not start and t.init_from:
        state = start_from(state, config, cfg, tx, devices)
    if start:
        restored = ckpt.restore(start, state, ema_like=ema and ema.value(), model_config=cfg,
                                run_fields=checkpoint_lib.resume_fields(config),
                                allow_changes=checkpoint_lib.parse_allow_changes(config.checkpoint.allow_changes))
        state = restored["state"]
        train_iter.set_state(restored["data"])
        if ema:
            ema.restore(restored["ema"])
        print(f"Resumed from {ckpt.path(start)}.")
    if lead:  # only now: a resume refused above leaves the run's config.json as it was
        save_config(workdir, config)

    recipe = recipe_for(config)
    step_fn = devices.jit_step(make_step(config, cfg, tx, recipe, devices.mesh),
                               donate=not ema)  # The EMA reads each step's params later.
    eval_cfg = dispatch.for_evaluation(cfg)
    eval_fn = devices.jit_eval(functools.partial(step_lib.eval_step, cfg=eval_cfg, recipe=recipe))
    current = {"state": state}

    def step(i: int) -> dict:
        current["state"], metrics = step_fn(current["state"], devices.batch(next(train_iter)))
        if ema:
            ema.update(current["state"].params)
        return metrics

    def validate() -> dict[str, float]:
        s = current["state"]
        with devices.context():
            result = evaluate(eval_cfg, {"params": s.params, "routing": s.routing}, config.data, t.eval_batches,
                              eval_fn, corpus, place=devices.batch)
        return {"eval_bpb": result["bpb"], "eval_loss": result["loss"]}

    def save(done: int, force: bool) -> str:
        ckpt.save(done, current["state"], ema=ema.value() if ema else None, data_state=train_iter.get_state(),
                  model_config=cfg, run_fields=checkpoint_lib.resume_fields(config), force=force)
        return ckpt.path(done)

    def postfix(host: dict[str, float]) -> dict[str, str]:
        shown = {"loss": f"{host['loss']:.3f}"}
        if "mtp_loss" in host:
            shown["mtp"] = f"{host['mtp_loss']:.3f}"
        return shown

    loop = RunLoop(workdir, name="train", steps=t.steps, eval_every=t.eval_every, log_every=t.log_every,
                   checkpoint_every=config.checkpoint.every, max_bad_steps=t.max_bad_steps,
                   tokens_per_step=config.data.batch_size * config.data.seq_len, lead=lead,
                   plots=[lambda csv: plot_losses(csv, os.path.join(workdir, "loss.png"), title=workdir)])
    try:
        with devices.context():
            summary = loop.run(start, step=step, evaluate=validate, save=save, postfix=postfix,
                               describe_eval=lambda r: f"validation {r['eval_bpb']:.3f} bits/byte",
                               checkpointer=ckpt)
    except BaseException:
        if ema:  # its thread too
            ema.close()
        raise
    ckpt.close()
    state = current["state"]
    summary.update(steps=int(placement.host_value(state.step)),
                   skipped_steps=int(placement.host_value(state.skipped_steps)))
    if t.sample_tokens and not summary["interrupted"]:
        variables = devices.on_one_device({"params": state.params, "routing": state.routing})
        summary["sample"] = sample_text(dispatch.for_one_device(eval_cfg), variables, config.data, t.sample_prompt,
                                        t.sample_tokens, t.sample_temperature, config.seed)
        if lead:
            print(f"\n--- sample (temperature {t.sample_temperature}) ---\n{summary['sample']}\n---")
    if ema:
        ema.close()
    if lead:
        write_json(workdir, "summary.json", json.dumps(summary, indent=2))
    return summary
