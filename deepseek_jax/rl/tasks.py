"""Verifiable tasks for GRPO: prompts with a ground-truth answer, generated from a seed or read from jsonl.

An `Example` is a prompt, the answer a reward checks against, and (for generated tasks) a worked
solution in the answer template, which is what the supervised warm start trains on.

The arithmetic task: `a+b=` or `a-b=` with operands below 10**digits written zero-padded to `digits`
digits (subtraction keeps the result >= 0). Its solutions follow the template the format reward
checks (rewards.py), with the result zero-padded to digits + 1 digits:

    347+586=<think>131309</think><answer>0933</answer>     047-005=<think>020400</think><answer>0042</answer>

The reasoning is column arithmetic, least significant column first: for each column two digits, the
carry (or borrow) it passes on, then the result digit (7+6 = 13: "13"; 4+8+1 = 13: "13"; 3+5+1 = 9:
"09"); the answer reads the final carry and the result digits back. The carry comes first because it
is a threshold of the column's digits, which a small model learns quickly, and given it the result
digit is their sum minus 10 x carry; a result digit written alone is (a + b) mod 10, which no single
input digit predicts, so learning it from scratch stalls (our tiny model sat at chance on it for over
800 steps). Fixed widths put every digit at a fixed distance from the digits it depends on. The
accuracy reward compares numerals by value, so "0933" is right for 933.

Splits are pure functions of (seed, index): the held-out prompts are the first `num_eval` distinct
problems of the eval stream (the jobs report greedy accuracy on them while training), the test prompts
the next `num_test` (no job looks at them: they are for the final report of an experiment whose settings
were chosen on the held-out ones), and a training draw that falls in either set is redrawn, so no
held-out or test problem is ever trained on (neither by SFT nor by RL).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

THINK = ("<think>", "</think>")
ANSWER = ("<answer>", "</answer>")
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # What the policy is given.
    answer: str  # Ground truth the accuracy reward compares the parsed answer with.
    solution: str = ""  # A completion in the answer template (empty for jsonl tasks without one).


def solution_text(reasoning: str, answer: str) -> str:
    """The completion template: `<think>reasoning</think><answer>answer</answer>`."""
    return f"{THINK[0]}{reasoning}{THINK[1]}{ANSWER[0]}{answer}{ANSWER[1]}"


def column_reasoning(a: int, b: int, op: str, digits: int) -> str:
    """Column arithmetic of `a op b` (a >= b for '-'), units first: per column the carry (or borrow) out,
    then the result digit; 2 x digits characters, e.g. 47+86 -> "1313", 47-05 -> "0204"."""
    out, carry = [], 0
    for k in range(digits):
        x, y = a // 10 ** k % 10, b // 10 ** k % 10
        column = x + y + carry if op == "+" else x - y - carry
        carry = int(column >= 10) if op == "+" else int(column < 0)
        out.append(f"{carry}{column % 10}")
    return "".join(out)


class Arithmetic:
    """Addition/subtraction of non-negative integers below 10**digits, drawn from `seed`."""

    def __init__(self, digits: int, operations: str, seed: int, num_eval: int, num_test: int = 0):
        if not (isinstance(digits, int) and 1 <= digits <= 18):
            raise ValueError(f"config.rl.task.digits={digits!r} is invalid: use an integer in [1, 18].")
        if not operations or set(operations) - set("+-"):
            raise ValueError(f"config.rl.task.operations={operations!r} is invalid: use '+', '-' or '+-'.")
        problems = (10 ** digits) ** 2 * len(operations)
        if num_eval + num_test >= problems // 2:
            raise ValueError(f"config.rl.task.num_eval + num_test = {num_eval} + {num_test} is too large for "
                             f"{digits}-digit problems ({problems} in all): hold out fewer than half of them, "
                             "or use more digits.")
        self.digits, self.operations, self.seed = digits, operations, seed
        held_out = self._distinct(self._stream(_EVAL_STREAM), num_eval + num_test)
        self.eval_examples, self.test_examples = held_out[:num_eval], held_out[num_eval:]
        self._held_out = {e.prompt for e in held_out}

    def _problem(self, rng: np.random.Generator) -> Example:
        high = 10 ** self.digits
        a, b = (int(x) for x in rng.integers(0, high, size=2))
        op = self.operations[int(rng.integers(len(self.operations)))]
        if op == "-" and a < b:
            a, b = b, a
        result = a + b if op == "+" else a - b
        padded = f"{result:0{self.digits + 1}d}"
        reasoning = column_reasoning(a, b, op, self.digits)
        return Example(f"{a:0{self.digits}d}{op}{b:0{self.digits}d}=", str(result), solution_text(reasoning, padded))

    def _stream(self, which: int) -> Iterator[Example]:
        rng = np.random.default_rng([self.seed, which])
        while True:
            yield self._problem(rng)

    @staticmethod
    def _distinct(stream: Iterator[Example], n: int) -> list[Example]:
        seen, out = set(), []
        while len(out) < n:
            example = next(stream)
            if example.prompt not in seen:
                seen.add(example.prompt)
                out.append(example)
        return out

    def train_examples(self, start: int, count: int, stream: int = 0) -> list[Example]:
        """Training problems `start` .. `start + count - 1` of training stream `stream` (never a held-out one).

        Problem i is a pure function of (seed, stream, i): a resumed run sees the same prompts, any slice
        of the stream agrees with the whole, and jobs drawing from different streams (supervised 0, GRPO 1)
        see different ones. A draw that hits a held-out prompt is redrawn from the same generator, so
        holding out more prompts (e.g. num_test) replaces only the problems that collide with them.
        """
        out = []
        for i in range(start, start + count):
            rng = np.random.default_rng([self.seed, _TRAIN_STREAM, stream, i])
            example = self._problem(rng)
            while example.prompt in self._held_out:
                example = self._problem(rng)
            out.append(example)
        return out


class JsonlTask:
    """User prompts from jsonl files: one `{"prompt": str, "answer": str|number}` object per line."""

    def __init__(self, train_path: str, eval_path: str, seed: int, num_eval: int):
        self.train = read_jsonl(train_path, "config.rl.task.train_path")
        self.eval_examples = read_jsonl(eval_path, "config.rl.task.eval_path")[:num_eval or None]
        self.test_examples: list[Example] = []  # Evaluate a test file of your own with evaluation.py.
        self.seed = seed

    def train_examples(self, start: int, count: int, stream: int = 0) -> list[Example]:
        """`count` examples from `start` on, in a seeded shuffle of the file per pass (and per stream)."""
        n = len(self.train)
        out = []
        for i in range(start, start + count):
            epoch, index = divmod(i, n)
            order = np.random.default_rng([self.seed, stream, epoch]).permutation(n)
            out.append(self.train[int(order[index])])
        return out


def read_jsonl(path: str, field: str) -> list[Example]:
    """Examples of a jsonl file; a bad line is a ValueError naming the file, the line and the fix."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"{field}={path!r} is not a file: give a jsonl of {{\"prompt\": ..., \"answer\": ...}} "
                         "lines.")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e}).") from None
            if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"]
                    and isinstance(record.get("answer"), (str, int, float))):
                raise ValueError(f"{path}:{lineno}: expected an object with a non-empty string \"prompt\" and "
                                 f"an \"answer\" (string or number), got {line.strip()[:80]!r}.")
            examples.append(Example(record["prompt"], str(record["answer"]), str(record.get("solution", ""))))
    if not examples:
        raise ValueError(f"{field}={path!r} holds no examples.")
    return examples


def write_sft_jsonl(examples: list[Example], path: str) -> None:
    """Solved problems as jsonl for `python -m deepseek_jax.train` (data.text_field='text'): each line's
    text is prompt + solution (the data pipeline appends the end-of-document token)."""
    if any(not e.solution for e in examples):
        raise ValueError("an example has no worked solution to train on (jsonl tasks need a \"solution\").")
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"text": e.prompt + e.solution, "prompt": e.prompt, "answer": e.answer}) + "\n")


def make_task(task_cfg, seed: int) -> Arithmetic | JsonlTask:
    """The task of `config.rl.task` (kind 'arithmetic' or 'jsonl')."""
    if task_cfg.kind == "arithmetic":
        return Arithmetic(task_cfg.digits, task_cfg.operations, seed, task_cfg.num_eval, task_cfg.num_test)
    if task_cfg.kind == "jsonl":
        return JsonlTask(task_cfg.train_path, task_cfg.eval_path, seed, task_cfg.num_eval)
    raise ValueError(f"config.rl.task.kind={task_cfg.kind!r} is invalid: use 'arithmetic' or 'jsonl'.")
