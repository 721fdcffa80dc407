"""The GRPO job: `train_grpo(config, workdir)` (what `python -m deepseek_jax.grpo` runs).

Each step: P training prompts (a pure function of the seed and the step, so a resumed run sees the
same ones), G sampled completions each from the current policy (`rollout.sample`), rule-based rewards
(`rewards.score`), group-normalised advantages, the old policy's log-probs (when mu > 1) and the
reference's (when beta > 0) computed once, then mu optimizer updates on the batch (`update.grpo_step`).
Greedy accuracy on the held-out prompts at step 0, every `rl.eval_every` steps and at the end.

Like the trainer it resumes from the latest checkpoint in `workdir` (the reference is re-read from
`rl.init_from`), saves a checkpoint and exits cleanly on SIGTERM, skips non-finite updates (stopping
after `train.max_bad_steps` in a row), shows a progress bar, and leaves in `workdir`: checkpoints/,
tensorboard/, metrics.csv, reward.png, config.json, summary.json.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from deepseek_jax.data import tokenizers
from deepseek_jax.rl import evaluation, objective, policy, rewards, rollout, tasks, update
from deepseek_jax.rl.config import loss_settings, optimizer_config, validate_rl_config
from deepseek_jax.rl.plots import plot_rewards
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.loop import SigtermFlag, TrainingStopped
from deepseek_jax.train.metrics import MetricWriter
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.validation import validate_run_config

UPDATE_METRICS = ("loss", "kl", "clip_fraction", "entropy", "ratio", "grad_norm")


def rollout_metrics(values: dict[str, np.ndarray], total: np.ndarray, weights: dict[str, float],
                    correct: np.ndarray, r: rollout.Rollouts, group_size: int) -> dict[str, float]:
    """Host metrics of one batch of rollouts: rewards, each reward's mean and share (its weighted mean
    over the sum of all weighted means' magnitudes), accuracy, groups whose rewards all tie (they carry
    no policy gradient), completion lengths."""
    groups = total.reshape(-1, group_size)
    mean = float(total.mean())
    out = {"reward": mean, "accuracy": float(correct.mean()),
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
    cfg = validate_run_config(config)
    validate_rl_config(config)
    rl = config.rl
    rewards.import_reward_modules(rl.reward_modules)
    weights = {k: float(v) for k, v in rl.rewards.to_dict().items()}
    reward_fns = rewards.resolve(weights)
    settings = loss_settings(rl)
    tokenizer = tokenizers.make_tokenizer(config.data)
    task = tasks.make_task(rl.task, config.seed)
    rollout.encode_prompts(tokenizer, task.eval_examples, rl.max_prompt_tokens)  # Too-long prompts fail now.
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    train_cfg = optimizer_config(config)
    tx = make_optimizer(train_cfg)
    variables, source = policy.load_policy(config, cfg)
    reference = jax.tree.map(jnp.copy, variables) if settings.kl_beta > 0 else None  # The state is donated.
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    state = step_lib.TrainState(step=zero(), params=variables["params"], opt_state=jax.jit(tx.init)(variables["params"]),
                                routing=variables["routing"], bad_steps=zero(), skipped_steps=zero())
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, state, ema_like=None, model_config=cfg)["state"]
        print(f"Resumed from {ckpt.path(start)}; reference policy: {source}.")
    else:
        print(f"Starting policy (and reference): {source}.")

    step_fn = jax.jit(functools.partial(update.grpo_step, cfg=cfg, settings=settings, temperature=float(rl.temperature),
                                        train_cfg=train_cfg, tx=tx), donate_argnums=(0,))
    score_fn = jax.jit(functools.partial(update.score, cfg=cfg, temperature=float(rl.temperature)))
    writer = MetricWriter(workdir)
    summary: dict = {"start_step": start, "policy_source": source}

    def evaluate(s: step_lib.TrainState) -> float:
        correct, _ = evaluation.greedy_correct(
            cfg, {"params": s.params, "routing": s.routing}, tokenizer, task.eval_examples,
            max_prompt_tokens=rl.max_prompt_tokens, max_new_tokens=rl.max_new_tokens, batch_size=rl.eval_batch_size)
        return float(correct.mean())

    if start == 0:
        summary["initial_eval_accuracy"] = evaluate(state)
        writer.write(0, {"eval_accuracy": summary["initial_eval_accuracy"]})

    t = config.train
    bar = tqdm.tqdm(initial=start, total=t.steps, desc="grpo", unit="step", mininterval=1.0, dynamic_ncols=True)
    started, last_eval = time.perf_counter(), summary.get("initial_eval_accuracy", float("nan"))
    with SigtermFlag() as sigterm:
        for step in range(start, t.steps):
            tick = time.perf_counter()
            examples = task.train_examples(step * rl.prompts_per_step, rl.prompts_per_step)
            variables = {"params": state.params, "routing": state.routing}
            r = rollout.sample(cfg, variables, tokenizer, examples, group_size=rl.group_size,
                               max_prompt_tokens=rl.max_prompt_tokens, max_new_tokens=rl.max_new_tokens,
                               temperature=float(rl.temperature), key=jax.random.fold_in(jax.random.key(config.seed), step))
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
            rollout_seconds = time.perf_counter() - tick
            updates = []
            for _ in range(rl.updates_per_batch):
                state, metrics = step_fn(state, batch)
                updates.append(jax.device_get(metrics))
                _check_finite(updates[-1], step, t.max_bad_steps)
            done = step + 1
            row = rollout_metrics(values, total, weights, correct, r, rl.group_size)
            row.update({k: float(np.mean([u[k] for u in updates])) for k in UPDATE_METRICS if k in updates[0]})
            row.update(step_seconds=time.perf_counter() - tick, rollout_seconds=rollout_seconds)
            if done % rl.eval_every == 0 or done == t.steps:
                last_eval = row["eval_accuracy"] = evaluate(state)
                summary["final_eval_accuracy"] = last_eval
            if done % t.log_every == 0 or "eval_accuracy" in row:
                writer.write(done, row)
            bar.set_postfix({"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.2f}",
                             "eval": f"{last_eval:.3f}", "kl": f"{row.get('kl', 0.0):.4f}"}, refresh=False)
            bar.update(1)
            if done % config.checkpoint.every == 0 or done == t.steps or sigterm.raised:
                ckpt.save(done, state, ema=None, data_state={"step": done}, model_config=cfg, force=sigterm.raised)
            if sigterm.raised:
                bar.write(f"SIGTERM: saved step {done} to {ckpt.path(done)}; exiting.")
                break
    bar.close()
    ckpt.close()
    writer.close()
    summary.update(steps=int(state.step) // rl.updates_per_batch, seconds=time.perf_counter() - started,
                   interrupted=bool(sigterm.raised))
    plot_rewards(writer.csv_path, os.path.join(workdir, "reward.png"), title=workdir)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _check_finite(metrics: dict, step: int, max_bad_steps: int) -> None:
    if bool(metrics["finite"]):
        return
    logging.warning("GRPO step %d: non-finite loss or gradient; update skipped (%d in a row).", step,
                    int(metrics["bad_steps"]))
    if int(metrics["bad_steps"]) >= max_bad_steps:
        raise TrainingStopped(f"{int(metrics['bad_steps'])} consecutive non-finite updates (at GRPO step {step}); "
                              "lower train.learning_rate or check the rewards. The last checkpoint is intact.")
