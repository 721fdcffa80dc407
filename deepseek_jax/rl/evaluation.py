"""Greedy accuracy on held-out prompts, and its 95% intervals (one model; the gain between two)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.rl import rewards, rollout
from deepseek_jax.rl.tasks import Example

Z95 = 1.959964


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


def wilson_interval(correct: np.ndarray) -> tuple[float, float]:
    """95% Wilson score interval of the accuracy of n independent 0/1 outcomes."""
    n = len(correct)
    p = float(np.mean(correct))
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return centre - half, centre + half


def paired_gain_interval(after: np.ndarray, before: np.ndarray) -> tuple[float, float, float]:
    """(gain, 95% low, 95% high) of accuracy `after` - `before` on the same prompts.

    Normal interval of the mean per-prompt difference (each in {-1, 0, 1}): pairing removes the
    prompts' own difficulty from the noise, so it is narrower than comparing two independent intervals.
    """
    d = after.astype(np.float64) - before.astype(np.float64)
    n = len(d)
    gain = float(d.mean())
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return gain, gain - half, gain + half
