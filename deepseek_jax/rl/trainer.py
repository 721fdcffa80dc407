"""The GRPO job: `train_grpo(config, workdir)` (what `python -m deepseek_jax.grpo` runs).

Each step: P training prompts (a pure function of the seed and the step, so a resumed run sees the
same ones), G sampled completions each from the current policy (`rollout.sample`), rule-based rewards
(`rewards.score`), group-normalised advantages, the old policy's log-probs (when mu > 1) and the
reference's (when beta > 0) computed once, then mu optimizer updates on the batch (`update.grpo_step`).
Greedy accuracy on the held-out prompts at step 0, every `rl.eval_every` steps and at the end.

Set-up, resume, evaluation, checkpoints and SIGTERM are job.py's (the reference is re-read from
`rl.init_from` on resume). Non-finite updates are skipped (the run loop stops after
`train.max_bad_steps` in a row). Leaves in `workdir`: checkpoints/, tensorboard/, metrics.csv,
reward.png, config.json, summary.json.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax.rl import objective, rewards, rollout, update
from deepseek_jax.rl.config import GRPO_RESUME_FIELDS, loss_settings, optimizer_config
from deepseek_jax.rl.job import Job, finite_row
from deepseek_jax.rl.plots import plot_rewards

UPDATE_METRICS = ("loss", "kl", "clip_fraction", "entropy", "ratio", "grad_norm")
RL_STREAM = 1  # The task's training stream GRPO draws prompts from (the supervised warm start uses 0).


def rollout_metrics(values: dict[str, np.ndarray], total: np.ndarray, weights: dict[str, float],
                    correct: np.ndarray, r: rollout.Rollouts, group_size: int) -> dict[str, float]:
    """Host metrics of one batch of rollouts: rewards, each reward's mean and share (its weighted mean
    over the sum of all weighted means' magnitudes), accuracy, groups whose rewards all tie (they carry
    no policy gradient), completion lengths."""
    groups = total.reshape(-1, group_size)
    out = {"reward": float(total.mean()), "accuracy": float(correct.mean()),
           "zero_variance_groups": float(np.mean(groups.max(axis=1) == groups.min(axis=1))),
           "completion_length": float(r.completion_lengths.mean()), "truncated": float(r.truncated.mean())}
    contributions = {name: weights[name] * float(v.mean()) for name, v in values.items()}
    scale = sum(abs(c) for c in contributions.values())
    for name, v in values.items():
        out[f"reward_{name}"] = float(v.mean())
        out[f"reward_share_{name}"] = contributions[name] / scale if scale else 0.0
    return out


def train_grpo(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs GRPO as `config` says in `workdir` (resuming if it holds checkpoints). Returns the summary."""
    rl = config.rl
    rewards.import_reward_modules(rl.reward_modules)
    weights = {k: float(v) for k, v in rl.rewards.to_dict().items()}
    reward_fns = rewards.resolve(weights)
    settings = loss_settings(rl)
    train_cfg = optimizer_config(config)
    job = Job(config, workdir, train_cfg, GRPO_RESUME_FIELDS)
    # A copy: the state, which starts from the same buffers, is donated to the update.
    reference = jax.device_put(jax.tree.map(jnp.copy, job.initial_variables), job.device) if settings.kl_beta else None
    job.initial_variables = None
    temperature = float(rl.temperature)
    update_fn = jax.jit(functools.partial(update.grpo_step, cfg=job.cfg, settings=settings, temperature=temperature,
                                          train_cfg=train_cfg, tx=job.tx), donate_argnums=(0,))
    score_fn = jax.jit(functools.partial(update.score, cfg=job.cfg, temperature=temperature))

    def step_fn(step: int, state):
        examples = job.task.train_examples(step * rl.prompts_per_step, rl.prompts_per_step, stream=RL_STREAM)
        variables = {"params": state.params, "routing": state.routing}
        r = rollout.sample(job.cfg, variables, job.tokenizer, examples, group_size=rl.group_size,
                           max_prompt_tokens=rl.max_prompt_tokens, max_new_tokens=rl.max_new_tokens,
                           temperature=temperature, key=jax.random.fold_in(jax.random.key(config.seed), step))
        prompts = [e.prompt for e in r.examples]
        values = rewards.score(reward_fns, prompts, r.completions, r.examples)
        total = rewards.combine(values, weights)
        correct = np.array([rewards.accuracy_reward(p, c, e) for p, c, e in zip(prompts, r.completions, r.examples)])
        batch = {k: jnp.asarray(v) for k, v in rollout.scoring_arrays(r).items()}
        batch["advantages"] = objective.group_advantages(total, rl.group_size, settings)
        if rl.updates_per_batch > 1:
            batch["old_logp"] = score_fn(variables, batch)
        if reference is not None:
            batch["ref_logp"] = score_fn(reference, batch)
        updates = []
        for _ in range(rl.updates_per_batch):
            state, metrics = update_fn(state, batch)
            updates.append(jax.device_get(metrics))
        row = rollout_metrics(values, total, weights, correct, r, rl.group_size)
        row.update({k: float(np.mean([u[k] for u in updates])) for k in UPDATE_METRICS if k in updates[0]})
        return state, {**row, **finite_row(updates)}

    def postfix(row: dict) -> dict[str, str]:
        shown = {"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.2f}"}
        if "kl" in row:
            shown["kl"] = f"{row['kl']:.4f}"
        return shown

    return job.run(step_fn, steps=config.train.steps, eval_every=rl.eval_every, log_every=config.train.log_every,
                   name="grpo", postfix=postfix,
                   plots=[lambda csv: plot_rewards(csv, os.path.join(workdir, "reward.png"), title=workdir)])
