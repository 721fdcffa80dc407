"""Rule-based rewards: a registry of Python callables `reward(prompt, completion, example) -> float`.

Built in:
- `accuracy`: 1 if the completion's final answer (the content of its last `<answer>...</answer>`)
  equals the example's answer, else 0. Numerals compare by exact value ("007" == "7", "2.50" == "2.5"),
  anything else as whitespace-stripped text. No answer -> 0.
- `format`: 1 if the whole completion is the template `<think>reasoning</think><answer>answer</answer>`
  (whitespace allowed around and between the two parts, each tag exactly once, nothing after), else 0.

A run combines rewards with weights (`config.rl.rewards`, name -> weight). Add one with

    @rewards.register("brevity")
    def brevity(prompt, completion, example): return -len(completion) / 100

in a module named in `config.rl.reward_modules` (imported at start-up). A reward that raises or returns
something that is not a finite number stops the run with a RewardError naming the reward and the
example: a silent zero would look like a policy that cannot solve the task.
"""

from __future__ import annotations

import decimal
import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from deepseek_jax.rl.tasks import Example

RewardFn = Callable[[str, str, Example], float]
_REGISTRY: dict[str, RewardFn] = {}

_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)  # Innermost complete pairs.
_TEMPLATE = re.compile(r"\s*<think>(?P<reasoning>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a finite number."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward under `name` (a name may be registered once)."""
    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({_REGISTRY[name]}).")
        _REGISTRY[name] = fn
        return fn
    return add


def registered() -> list[str]:
    return sorted(_REGISTRY)


def import_reward_modules(modules: str) -> None:
    """Imports the comma-separated modules of `config.rl.reward_modules` (they register rewards)."""
    for name in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"config.rl.reward_modules: cannot import {name!r} ({e}); give importable "
                             "module names, comma-separated.") from e


def resolve(weights: Mapping[str, float]) -> dict[str, RewardFn]:
    """The reward functions of `config.rl.rewards` (name -> weight), checked."""
    if not weights:
        raise ValueError("config.rl.rewards is empty: give at least one reward, e.g. {'accuracy': 1.0}.")
    unknown = sorted(set(weights) - set(_REGISTRY))
    if unknown:
        raise ValueError(f"config.rl.rewards names unknown rewards {unknown}; registered: {registered()} "
                         "(add yours with rewards.register in a module listed in config.rl.reward_modules).")
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w)):
            raise ValueError(f"config.rl.rewards.{name}={w!r} is invalid: use a finite number.")
    return {name: _REGISTRY[name] for name in weights}


def parse_answer(completion: str) -> str | None:
    """The stripped content of the last complete `<answer>...</answer>` pair, or None if there is none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def _as_number(text: str) -> decimal.Decimal | None:
    """The exact value of a numeral ("007", "-12", "3.50", "1e3"), or None."""
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_match(predicted: str | None, truth: str) -> bool:
    if predicted is None:
        return False
    a, b = _as_number(predicted), _as_number(truth.strip())
    if a is not None and b is not None:
        return a == b
    return predicted == truth.strip()


@register("accuracy")
def accuracy_reward(prompt: str, completion: str, example: Example) -> float:
    del prompt
    return float(answers_match(parse_answer(completion), example.answer))


@register("format")
def format_reward(prompt: str, completion: str, example: Example) -> float:
    del prompt, example
    match = _TEMPLATE.fullmatch(completion)
    if match is None:
        return 0.0
    once = all(completion.count(tag) == 1 for tag in _TAGS)
    return float(once)


def score(fns: Mapping[str, RewardFn], prompts: Sequence[str], completions: Sequence[str],
          examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Each reward's values, name -> float64 [N], for N (prompt, completion, example) triples."""
    out = {}
    for name, fn in fns.items():
        values = np.empty(len(completions), np.float64)
        for i, (prompt, completion, example) in enumerate(zip(prompts, completions, examples)):
            try:
                value = fn(prompt, completion, example)
            except Exception as e:
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} on prompt {prompt!r}, "
                                  f"completion {completion!r}, answer {example.answer!r}.") from e
            if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
                raise RewardError(f"reward {name!r} returned {value!r} (not a finite number) on prompt "
                                  f"{prompt!r}, completion {completion!r}: return a float.")
            values[i] = float(value)
        out[name] = values
    return out


def combine(values: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The total reward sum_k w_k r_k, float64 [N]."""
    return sum(weights[name] * v for name, v in values.items())
