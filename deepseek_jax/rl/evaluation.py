"""Greedy accuracy on held-out prompts (its 95% intervals are experiments/accuracy_intervals.py's)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.rl import rewards, rollout
from deepseek_jax.rl.tasks import Example


def greedy_correct(cfg: ModelConfig, variables: dict, tokenizer, examples: Sequence[Example], *,
                   max_prompt_tokens: int, max_new_tokens: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """(bool [n]: the greedy completion's answer is right, the completions).

    Decodes `batch_size` prompts at a time; the last batch is filled up with repeats so every batch has
    the same shape (one compiled program).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no held-out prompts to evaluate (config.rl.task.num_eval / eval_path).")
    completions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        out = rollout.sample(cfg, variables, tokenizer, padded, group_size=1, max_prompt_tokens=max_prompt_tokens,
                             max_new_tokens=max_new_tokens, temperature=0.0, key=None)
        completions.extend(out.completions[:len(chunk)])
    correct = np.array([rewards.answers_match(rewards.parse_answer(c), e.answer)
                        for c, e in zip(completions, examples)], bool)
    return correct, completions
