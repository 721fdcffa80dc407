"""Validation: bits per byte of the model on the held-out split, for a live state or a checkpoint."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax.data import pipeline
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.checkpoint import CheckpointError
from deepseek_jax.train.placement import host_value
from deepseek_jax.train.precision import recipe_for
from deepseek_jax.train.validation import validate_run_config
from deepseek_jax.train.weights import load_weights


def model_inputs(batch: dict) -> dict:
    """The model's int32 inputs of a data batch (drops bookkeeping such as num_bytes)."""
    return {k: jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions")}


def evaluate(cfg: ModelConfig, variables: dict, data_cfg: ml_collections.ConfigDict, max_batches: int,
             eval_fn=None, corpus=None, place=model_inputs) -> dict[str, float]:
    """{'loss' (nats/token), 'bpb' (bits per byte), 'tokens'} over up to `max_batches` (0 = all).

    Pass `corpus` (pipeline.load_corpus) to avoid re-reading the documents on every evaluation, and
    `place` to put each global batch where `eval_fn` wants it (e.g. sharded over a mesh).
    """
    eval_fn = eval_fn or jax.jit(functools.partial(step_lib.eval_step, cfg=cfg))
    nll = tokens = num_bytes = 0.0
    for i, batch in enumerate(pipeline.make_eval_iterator(data_cfg, corpus=corpus)):
        if max_batches and i >= max_batches:
            break
        out = eval_fn(variables["params"], variables["routing"], place(batch))
        nll += float(host_value(out["nll"]))
        tokens += float(host_value(out["tokens"]))
        num_bytes += float(np.sum(batch["num_bytes"]))
    if not tokens:
        raise ValueError("the validation split produced no tokens to score; add validation data.")
    return {"loss": nll / tokens, "bpb": nll / math.log(2) / max(num_bytes, 1.0), "tokens": tokens}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
                        use_ema: bool = False) -> dict:
    """Validation metrics of a checkpoint in `workdir/checkpoints` (the latest unless `step`)."""
    cfg = validate_run_config(config)
    weights = load_weights(workdir, cfg, optimizer_cfg=config.train, step=step, use_ema=use_ema, field="--workdir")
    if weights.step is None:
        raise CheckpointError(f"{workdir} holds no training checkpoint (no {workdir}/checkpoints); train first.")
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, cfg=cfg, recipe=recipe_for(config)))
    result = evaluate(cfg, weights.variables, config.data, config.train.eval_batches, eval_fn)
    return {"step": weights.step, "weights": "ema" if use_ema else "params", **result}
