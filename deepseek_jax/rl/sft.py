"""Supervised fine-tuning on a task's worked solutions: the warm start before GRPO, and its control.

Legend: B examples per step, W = max_prompt_tokens + max_new_tokens.

Each step trains on B training examples (`config.rl.sft.batch_size`) from stream 0 of the task (never
the prompts GRPO draws): fresh ones each step, or passes over a fixed set of `rl.sft.num_examples`
worked solutions (demonstrations are the scarce resource; GRPO needs only prompts and answers).
One per row laid out exactly like a GRPO rollout: prompt, solution, end of
document, padding. The loss is the mean next-token cross entropy over the completion tokens only
(the prompt is given, not learned). Set-up, resume, evaluation and checkpoints are job.py's, so a
resumed run continues the same example stream with the same learning rate: "continuing SFT".

Why not `python -m deepseek_jax.train` on a jsonl of solutions (which also works: `--write_sft_data`
writes one, and its checkpoints start GRPO): it packs documents into rows, cutting some problems in
two, and it learns the prompts too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.rl import rollout, update
from deepseek_jax.rl.config import SFT_RESUME_FIELDS
from deepseek_jax.rl.job import Job, finite_row
from deepseek_jax.rl.tasks import Example
from deepseek_jax.train import step as step_lib

SFT_STREAM = 0


def sft_batch(tokenizer, examples: list[Example], max_prompt_tokens: int, max_new_tokens: int) -> dict[str, np.ndarray]:
    """tokens, segment_ids int32 [B, W] and the completion mask float32 [B, W-1] (rollout.scoring_arrays)."""
    prompt_ids, prompt_lengths = rollout.encode_prompts(tokenizer, examples, max_prompt_tokens)
    width = max_prompt_tokens + max_new_tokens
    tokens = np.full((len(examples), width), tokenizer.pad_id, np.int32)
    lengths = np.zeros((len(examples),), np.int32)
    for i, example in enumerate(examples):
        if not example.solution:
            raise ValueError(f"example {example.prompt!r} has no worked solution to train on (jsonl tasks need "
                             "a \"solution\" field for the supervised stage).")
        completion = np.append(tokenizer.encode(example.solution), tokenizer.eos_id)
        if len(completion) > max_new_tokens:
            raise ValueError(f"the solution of {example.prompt!r} is {len(completion)} tokens with the end token: "
                             f"config.rl.max_new_tokens={max_new_tokens} must be at least that.")
        n = prompt_lengths[i]
        tokens[i, :n], tokens[i, n:n + len(completion)] = prompt_ids[i, :n], completion
        lengths[i] = n + len(completion)
    r = rollout.Rollouts(examples=list(examples), completions=[e.solution for e in examples], tokens=tokens,
                         prompt_lengths=prompt_lengths, lengths=lengths, truncated=np.zeros(len(examples), bool))
    return rollout.scoring_arrays(r)


def sft_loss(params, routing, batch: dict, *, cfg: ModelConfig):
    """(mean cross entropy over completion tokens, (metrics, router stats))."""
    out = update.forward(cfg, {"params": params, "routing": routing}, batch)
    logp, _ = update.logprobs_from_logits(out.logits, batch["tokens"], 1.0)
    mask = batch["mask"]
    loss = -jnp.sum(logp * mask) / jnp.maximum(mask.sum(), 1.0)
    return loss, ({"loss": loss}, update.with_idle_modules(routing, out.router_stats))


def sft_step(state: step_lib.TrainState, batch: dict, *, cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
             tx: optax.GradientTransformation) -> tuple[step_lib.TrainState, dict]:
    grads, (metrics, router_stats) = jax.grad(sft_loss, has_aux=True)(state.params, state.routing, batch, cfg=cfg)
    return step_lib.apply_update(state, grads, metrics, router_stats, train_cfg, tx)


def from_pool(pool: list[Example], start: int, count: int, seed: int) -> list[Example]:
    """Examples start .. start+count-1 of passes over `pool`, each pass in its own seeded order."""
    out = []
    for i in range(start, start + count):
        epoch, index = divmod(i, len(pool))
        out.append(pool[int(np.random.default_rng([seed, epoch]).permutation(len(pool))[index])])
    return out


def optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.train` (betas, weight decay, clipping) with the schedule of `config.rl.sft`: linear warmup,
    then constant, so that a resumed run continues at the same rate."""
    t = ml_collections.ConfigDict(config.train.to_dict())
    s = config.rl.sft
    t.update(steps=s.steps, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, decay_start=1.0)
    return t


def train_sft(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Supervised fine-tuning as `config.rl.sft` says, in `workdir` (resuming if it holds checkpoints)."""
    s, rl = config.rl.sft, config.rl
    train_cfg = optimizer_config(config)
    job = Job(config, workdir, train_cfg, SFT_RESUME_FIELDS)
    job.initial_variables = None
    update_fn = jax.jit(functools.partial(sft_step, cfg=job.cfg, train_cfg=train_cfg, tx=job.tx), donate_argnums=(0,))

    pool = job.task.train_examples(0, s.num_examples, stream=SFT_STREAM) if s.num_examples else None

    def step_fn(step: int, state):
        examples = (job.task.train_examples(step * s.batch_size, s.batch_size, stream=SFT_STREAM) if pool is None
                    else from_pool(pool, step * s.batch_size, s.batch_size, config.seed))
        batch = sft_batch(job.tokenizer, examples, rl.max_prompt_tokens, rl.max_new_tokens)
        state, metrics = update_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
        metrics = jax.device_get(metrics)
        return state, {**{k: float(metrics[k]) for k in ("loss", "grad_norm")}, **finite_row([metrics])}

    return job.run(step_fn, steps=s.steps, eval_every=s.eval_every, log_every=config.train.log_every, name="sft",
                   postfix=lambda row: {"loss": f"{row['loss']:.3f}"})
