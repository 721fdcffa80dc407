"""GRPO on arithmetic with the tiny model: a supervised warm start, then RL, against continuing SFT.

    python experiments/grpo_arithmetic.py [--workdir=runs/grpo_arithmetic] [--config.rl.sft.steps=...]

All settings come from configs/grpo_arithmetic.py (overridable with --config.*):
1. SFT (`train_sft`, i.e. python -m deepseek_jax.grpo --sft) from random weights on worked solutions.
2. GRPO (`train_grpo`) from that checkpoint, on fresh training prompts that come with answers only.
3. Control: the SFT run resumed (same examples, same constant learning rate, same optimizer state) for
   as much compute as GRPO used, counted in model token passes over padded rows (a forward pass over
   one token = 1, forward + backward = 3): GRPO's rollouts (prompt + generation budget per completion),
   its old/reference scoring passes and its mu updates per batch; SFT's 3 per token of its batches.
4. Greedy accuracy of the three checkpoints on the same test prompts (`rl.task.num_test`, drawn after the
   held-out prompts the runs evaluate on while training and on which the settings were chosen; neither
   set is trained on), with 95% Wilson intervals and paired 95% intervals of the differences.
Writes experiments/results/grpo_arithmetic.json, grpo_arithmetic.png (held-out accuracy against compute
for the three phases and each final test accuracy; GRPO's rewards per step) and grpo_arithmetic_reward.png
(the run's reward.png).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from accuracy_intervals import paired_gain_interval, wilson_interval  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deepseek_jax.data import tokenizers  # noqa: E402
from deepseek_jax.rl import evaluation, tasks  # noqa: E402
from deepseek_jax.rl.plots import smooth  # noqa: E402
from deepseek_jax.rl.sft import train_sft  # noqa: E402
from deepseek_jax.rl.trainer import train_grpo  # noqa: E402
from deepseek_jax.train.metrics import read_csv  # noqa: E402
from deepseek_jax.train.validation import validate_run_config  # noqa: E402
from deepseek_jax.train.weights import load_weights  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "grpo_arithmetic.py"), "Config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/grpo_arithmetic", "Where the three runs go (replaced).")
_CONTROL_EVALS = flags.DEFINE_integer("control_evals", 4, "Held-out evaluations along the continued SFT.")
_NUM_TEST = flags.DEFINE_integer("num_test", 1000, "Test prompts for the final comparison (rl.task.num_test).")


def grpo_token_passes_per_step(config) -> int:
    rl = config.rl
    rows, width = rl.prompts_per_step * rl.group_size, rl.max_prompt_tokens + rl.max_new_tokens
    scoring = int(rl.updates_per_batch > 1) + int(rl.kl_beta > 0)
    return rows * width * (1 + scoring + 3 * rl.updates_per_batch)


def sft_token_passes_per_step(config) -> int:
    return 3 * config.rl.sft.batch_size * (config.rl.max_prompt_tokens + config.rl.max_new_tokens)


def test_correct(config, workdir: str, test_examples: list[tasks.Example]) -> np.ndarray:
    """Greedy correctness [len(test_examples)] of the latest checkpoint in `workdir`."""
    weights = load_weights(workdir, validate_run_config(config), optimizer_cfg=config.train)
    cfg, variables = weights.cfg, weights.variables
    correct, _ = evaluation.greedy_correct(
        cfg, variables, tokenizers.make_tokenizer(config.data), test_examples,
        max_prompt_tokens=config.rl.max_prompt_tokens, max_new_tokens=config.rl.max_new_tokens,
        batch_size=config.rl.eval_batch_size)
    return correct


def describe(correct: np.ndarray) -> dict:
    lo, hi = wilson_interval(correct)
    return {"accuracy": float(correct.mean()), "ci95": [lo, hi], "n": int(len(correct))}


def difference(after: np.ndarray, before: np.ndarray) -> dict:
    g, lo, hi = paired_gain_interval(after, before)
    return {"gain": g, "ci95": [lo, hi]}


def eval_curve(workdir: str, passes_per_step: int, offset: int = 0) -> list[tuple[int, float]]:
    columns = read_csv(os.path.join(workdir, "metrics.csv"))
    logged = ~np.isnan(columns["eval_accuracy"])
    return [(offset + int(s) * passes_per_step, float(a))
            for s, a in zip(columns["step"][logged], columns["eval_accuracy"][logged])]


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    config.rl.task.num_test = _NUM_TEST.value
    test_examples = tasks.make_task(config.rl.task, config.seed).test_examples
    if not test_examples:  # Refused before training, not after it.
        raise ValueError(f"--num_test={_NUM_TEST.value}: the final comparison needs test prompts; set it > 0.")
    work = pathlib.Path(_WORKDIR.value).absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sft_dir, grpo_dir, control_dir = str(work / "sft"), str(work / "grpo"), str(work / "sft_continued")
    started, seconds = time.perf_counter(), {}

    def timed(name, fn, *args):
        tick = time.perf_counter()
        out = fn(*args)
        seconds[name] = time.perf_counter() - tick
        return out

    sft_config = config.copy_and_resolve_references()
    sft_steps = sft_config.rl.sft.steps
    timed("sft", train_sft, sft_config, sft_dir)

    grpo_config = config.copy_and_resolve_references()
    grpo_config.rl.init_from = sft_dir
    timed("grpo", train_grpo, grpo_config, grpo_dir)  # Its held-out evaluations included.

    grpo_passes = grpo_token_passes_per_step(grpo_config) * grpo_config.train.steps
    extra_steps = max(1, round(grpo_passes / sft_token_passes_per_step(sft_config)))
    shutil.copytree(sft_dir, control_dir)
    control_config = config.copy_and_resolve_references()
    control_config.rl.sft.steps = sft_steps + extra_steps
    control_config.rl.sft.eval_every = max(1, extra_steps // _CONTROL_EVALS.value)
    timed("sft_continued", train_sft, control_config, control_dir)

    runs = (("sft", sft_dir), ("grpo", grpo_dir), ("sft_continued", control_dir))
    correct = timed("final_evaluations",
                    lambda: {name: test_correct(grpo_config, d, test_examples) for name, d in runs})
    seconds["total"] = time.perf_counter() - started

    sft_passes = sft_token_passes_per_step(sft_config)
    warm = sft_steps * sft_passes
    result = {
        "config": config.to_dict(),
        "accuracy_on": "test prompts (rl.task.num_test): never trained on, not used to choose settings; "
                       "curves are on the held-out prompts (rl.task.num_eval)",
        "sft": {"steps": sft_steps, "token_passes": warm, **describe(correct["sft"])},
        "grpo": {"steps": grpo_config.train.steps, "token_passes": grpo_passes, **describe(correct["grpo"]),
                 "gain_over_sft": difference(correct["grpo"], correct["sft"]),
                 "gain_over_sft_continued": difference(correct["grpo"], correct["sft_continued"])},
        "sft_continued": {"extra_steps": extra_steps, "token_passes": extra_steps * sft_passes,
                          **describe(correct["sft_continued"]),
                          "gain_over_sft": difference(correct["sft_continued"], correct["sft"])},
        "curves": {"sft": eval_curve(sft_dir, sft_passes),
                   "grpo": eval_curve(grpo_dir, grpo_token_passes_per_step(grpo_config), warm),
                   "sft_continued": [p for p in eval_curve(control_dir, sft_passes) if p[0] >= warm]},
        "wall_seconds": seconds,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15_min_at_end": os.getloadavg()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_arithmetic.json").write_text(json.dumps(result, indent=1))
    plot(result, read_csv(os.path.join(grpo_dir, "metrics.csv")), RESULTS / "grpo_arithmetic.png")
    shutil.copyfile(os.path.join(grpo_dir, "reward.png"), RESULTS / "grpo_arithmetic_reward.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "curves")}, indent=1))


def plot(result: dict, columns: dict, path: pathlib.Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name, label, style in (("sft", "SFT warm start", "k.-"), ("grpo", "GRPO", "o-"),
                               ("sft_continued", "continued SFT (same compute)", "s--")):
        x, y = zip(*result["curves"][name])
        line, = left.plot(np.array(x) / 1e6, np.array(y) * 100, style, label=f"{label} (held-out)")
        r = result[name]  # The final checkpoint on the test prompts, with its 95% interval.
        left.errorbar([x[-1] / 1e6], [r["accuracy"] * 100], yerr=[[(r["accuracy"] - r["ci95"][0]) * 100],
                                                                 [(r["ci95"][1] - r["accuracy"]) * 100]],
                      fmt="D", color=line.get_color(), mfc="none", capsize=4)
    task = result["config"]["rl"]["task"]
    left.set_xlabel("compute (million token passes: forward 1, forward + backward 3)")
    left.set_ylabel("greedy accuracy (%)")
    left.set_title(f"{task['digits']}-digit '{task['operations']}': lines {task['num_eval']} held-out prompts, "
                   f"\u25c7 {task['num_test']} test prompts (95% CI)", fontsize=10)
    step = columns["step"]
    for name in ("reward", "accuracy", "reward_format", "zero_variance_groups"):
        logged = ~np.isnan(columns[name])
        right.plot(step[logged], smooth(columns[name][logged], 5), label=name)
    right.set_xlabel("GRPO step")
    right.set_title("GRPO rollouts (sampled, moving average of 5 steps)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
