"""GRPO on arithmetic with the tiny model: a supervised warm start, then RL, against continuing SFT.

    python experiments/grpo_arithmetic.py [--workdir=runs/grpo_arithmetic] [--sft_steps=...] [--grpo_steps=...]

1. Solved training problems of configs/grpo_arithmetic.py's task -> sft.jsonl (held-out prompts excluded).
2. SFT: `train_and_evaluate` (what `python -m deepseek_jax.train` runs) on them for --sft_steps.
3. GRPO from that checkpoint for --grpo_steps (`train_grpo`, what `python -m deepseek_jax.grpo` runs).
4. Control: the SFT run resumed (same data stream, same constant learning rate) for as much compute as
   GRPO used, counted in model token passes (a forward pass over one token = 1, forward + backward = 3):
   GRPO's rollouts (prefill + decode over the padded width), its old/reference scoring passes and its
   mu updates per batch; SFT's batch x seq_len x 3 per step.
5. Greedy accuracy of the three policies on the same held-out prompts, with 95% Wilson intervals and
   paired intervals of the gains.
Writes experiments/results/grpo_arithmetic.json, grpo_arithmetic.png (held-out accuracy against
compute, GRPO's rewards over steps) and grpo_arithmetic_reward.png (the run's own reward.png).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deepseek_jax import defaults  # noqa: E402
from deepseek_jax.data import tokenizers  # noqa: E402
from deepseek_jax.infer import checkpoints  # noqa: E402
from deepseek_jax.rl import evaluation, tasks  # noqa: E402
from deepseek_jax.rl.plots import smooth  # noqa: E402
from deepseek_jax.rl.trainer import train_grpo  # noqa: E402
from deepseek_jax.train.loop import train_and_evaluate  # noqa: E402
from deepseek_jax.train.metrics import read_csv  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CONFIG = str(ROOT / "configs" / "grpo_arithmetic.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/grpo_arithmetic", "Where the three runs go (replaced).")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", None, "Supervised warm-start steps (default: the config's).")
_GRPO_STEPS = flags.DEFINE_integer("grpo_steps", None, "GRPO steps (default: the config's).")
_SFT_EXAMPLES = flags.DEFINE_integer("sft_examples", 50000, "Solved problems written for SFT (a stream "
                                     "longer than both SFT runs read, so the control sees fresh ones).")
_CURVE_POINTS = flags.DEFINE_integer("curve_points", 4, "Held-out evaluations along the continued SFT.")


def grpo_compute_per_step(config) -> int:
    """Token passes of one GRPO step (see the module docstring)."""
    rl = config.rl
    n, width = rl.prompts_per_step * rl.group_size, rl.max_prompt_tokens + rl.max_new_tokens
    scoring = (rl.updates_per_batch > 1) + (rl.kl_beta > 0)
    return n * width * (1 + scoring + 3 * rl.updates_per_batch)


def sft_compute_per_step(config) -> int:
    return 3 * config.data.batch_size * config.data.seq_len


def held_out(config, workdir: str, step: int | None = None) -> np.ndarray:
    """Greedy correctness [num_eval] of a checkpoint (a training or a GRPO run: both save a TrainState)."""
    cfg, variables, _ = checkpoints.load_trained(config, workdir, step=step)
    task = tasks.make_task(config.rl.task, config.seed)
    correct, _ = evaluation.greedy_correct(
        cfg, variables, tokenizers.make_tokenizer(config.data), task.eval_examples,
        max_prompt_tokens=config.rl.max_prompt_tokens, max_new_tokens=config.rl.max_new_tokens,
        batch_size=config.rl.eval_batch_size)
    return correct


def describe(correct: np.ndarray) -> dict:
    lo, hi = evaluation.wilson_interval(correct)
    return {"accuracy": float(correct.mean()), "ci95": [lo, hi], "n": int(len(correct))}


def gain(after: np.ndarray, before: np.ndarray) -> dict:
    g, lo, hi = evaluation.paired_gain_interval(after, before)
    return {"gain": g, "ci95": [lo, hi]}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    work = pathlib.Path(_WORKDIR.value).absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sft_dir, grpo_dir, cont_dir = str(work / "sft"), str(work / "grpo"), str(work / "sft_continued")
    started, seconds = time.perf_counter(), {}

    sft_config = defaults.load_config(CONFIG + ":stage=sft")
    sft_config.data.path = str(work / "sft.jsonl")
    if _SFT_STEPS.value:
        sft_config.train.steps = _SFT_STEPS.value
    sft_steps = sft_config.train.steps
    sft_config.checkpoint.every = sft_steps
    task = tasks.make_task(sft_config.rl.task, sft_config.seed)
    tasks.write_sft_jsonl(task.train_examples(0, _SFT_EXAMPLES.value), sft_config.data.path)

    tick = time.perf_counter()
    train_and_evaluate(sft_config, sft_dir)
    seconds["sft"] = time.perf_counter() - tick

    grpo_config = defaults.load_config(CONFIG)
    grpo_config.rl.init_from = sft_dir
    if _GRPO_STEPS.value:
        grpo_config.train.steps = _GRPO_STEPS.value
    tick = time.perf_counter()
    grpo_summary = train_grpo(grpo_config, grpo_dir)
    seconds["grpo"] = time.perf_counter() - tick  # Its held-out evaluations included.

    grpo_compute = grpo_compute_per_step(grpo_config) * grpo_config.train.steps
    extra_steps = max(1, round(grpo_compute / sft_compute_per_step(sft_config)))
    shutil.copytree(sft_dir, cont_dir)
    cont_config = defaults.load_config(CONFIG + ":stage=sft")
    cont_config.data.path = sft_config.data.path
    cont_config.train.steps = sft_steps + extra_steps
    cont_config.checkpoint.every = max(1, math.ceil(extra_steps / _CURVE_POINTS.value))
    cont_config.checkpoint.keep = _CURVE_POINTS.value + 2
    tick = time.perf_counter()
    train_and_evaluate(cont_config, cont_dir)
    seconds["sft_continued"] = time.perf_counter() - tick

    tick = time.perf_counter()
    correct = {"sft": held_out(grpo_config, sft_dir), "grpo": held_out(grpo_config, grpo_dir),
               "sft_continued": held_out(grpo_config, cont_dir)}
    cont_curve = []
    for step in sorted(checkpoints_steps(cont_dir)):
        if sft_steps < step < cont_config.train.steps:
            accuracy = float(held_out(grpo_config, cont_dir, step).mean())
            cont_curve.append(((step - sft_steps) * sft_compute_per_step(sft_config), accuracy))
    seconds["final_evaluations"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started

    columns = read_csv(os.path.join(grpo_dir, "metrics.csv"))
    evaluated = ~np.isnan(columns["eval_accuracy"])
    grpo_curve = [(int(s) * grpo_compute_per_step(grpo_config), float(a))
                  for s, a in zip(columns["step"][evaluated], columns["eval_accuracy"][evaluated])]
    cont_curve = [(0, float(correct["sft"].mean()))] + cont_curve + [(extra_steps * sft_compute_per_step(sft_config),
                                                                        float(correct["sft_continued"].mean()))]
    result = {
        "task": {k: sft_config.rl.task[k] for k in ("digits", "operations", "num_eval")},
        "sft": {"steps": sft_steps, "batch": [sft_config.data.batch_size, sft_config.data.seq_len],
                "learning_rate": sft_config.train.learning_rate, **describe(correct["sft"])},
        "grpo": {"steps": grpo_config.train.steps, "rl": grpo_config.rl.to_dict(),
                 "learning_rate": grpo_config.train.learning_rate, "token_passes": grpo_compute,
                 **describe(correct["grpo"]), "gain_over_sft": gain(correct["grpo"], correct["sft"]),
                 "gain_over_sft_continued": gain(correct["grpo"], correct["sft_continued"]),
                 "initial_eval_accuracy_in_run": grpo_summary.get("initial_eval_accuracy")},
        "sft_continued": {"extra_steps": extra_steps, "token_passes": extra_steps * sft_compute_per_step(sft_config),
                          **describe(correct["sft_continued"]),
                          "gain_over_sft": gain(correct["sft_continued"], correct["sft"])},
        "curves": {"grpo_eval_accuracy": grpo_curve, "sft_continued_eval_accuracy": cont_curve},
        "wall_seconds": seconds,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_arithmetic.json").write_text(json.dumps(result, indent=1))
    plot(result, columns, RESULTS / "grpo_arithmetic.png")
    shutil.copyfile(os.path.join(grpo_dir, "reward.png"), RESULTS / "grpo_arithmetic_reward.png")
    print(json.dumps({k: result[k] for k in ("sft", "sft_continued", "wall_seconds")}, indent=1))
    print(json.dumps({k: v for k, v in result["grpo"].items() if k != "rl"}, indent=1))


def checkpoints_steps(workdir: str) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    return [int(p.name) for p in directory.iterdir() if p.name.isdigit()]


def plot(result: dict, columns: dict, path: pathlib.Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    for name, key, style in (("GRPO", "grpo_eval_accuracy", "o-"), ("continued SFT", "sft_continued_eval_accuracy", "s--")):
        x, y = zip(*result["curves"][key])
        left.plot(np.array(x) / 1e6, np.array(y) * 100, style, label=name)
    for name in ("grpo", "sft_continued"):
        lo, hi = result[name]["ci95"]
        x = result[name]["token_passes"] / 1e6
        left.errorbar([x], [result[name]["accuracy"] * 100], yerr=[[(result[name]["accuracy"] - lo) * 100],
                                                                     [(hi - result[name]["accuracy"]) * 100]],
                      fmt="none", ecolor="k", capsize=4)
    left.set_xlabel("compute after the SFT warm start (million token passes)")
    left.set_ylabel("greedy accuracy on held-out prompts (%)")
    left.set_title(f"{result['task']['digits']}-digit {result['task']['operations']}, "
                   f"{result['sft']['n']} held-out prompts (95% intervals)")
    step = columns["step"]
    for name in ("reward", "accuracy", "reward_format"):
        logged = ~np.isnan(columns[name])
        right.plot(step[logged], smooth(columns[name][logged], 5), label=f"{name} (sampled, smoothed)")
    right.set_xlabel("GRPO step")
    right.set_title("GRPO rollouts")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
