"""95% intervals of greedy accuracy (one model) and of the gain between two on the same prompts, for
experiments/grpo_arithmetic.py."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959964


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
