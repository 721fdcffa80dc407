"""reward.png: a GRPO run's rewards and accuracies over steps, from its metrics.csv."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax.train.metrics import read_csv  # noqa: E402


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (NaNs ignored), the same length as `values`."""
    out = np.full(values.shape, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        chunk = chunk[~np.isnan(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


def plot_rewards(csv_path: str, png_path: str, title: str = "", window: int = 10) -> None:
    """Left: mean reward and each reward's mean per step (faint) and smoothed. Right: accuracy of the
    sampled completions (smoothed) and greedy held-out accuracy."""
    columns = read_csv(csv_path)
    if not columns:
        return
    step = columns["step"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["reward"] + sorted(k for k in columns if k.startswith("reward_") and not k.startswith("reward_share_"))
    for name in names:
        logged = ~np.isnan(columns[name])
        line, = left.plot(step[logged], smooth(columns[name][logged], window), label=name)
        left.plot(step[logged], columns[name][logged], color=line.get_color(), alpha=0.2)
    left.set_title("rewards of the sampled completions")
    if "accuracy" in columns:
        logged = ~np.isnan(columns["accuracy"])
        right.plot(step[logged], smooth(columns["accuracy"][logged], window), label="sampled (smoothed)")
    if "eval_accuracy" in columns:
        logged = ~np.isnan(columns["eval_accuracy"])
        right.plot(step[logged], columns["eval_accuracy"][logged], "o-", label="greedy, held-out prompts")
    right.set_title("accuracy")
    for ax in (left, right):
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
