"""GRPO's host side: answer parsing, the accuracy and format rewards, the registry, the tasks and the
accuracy intervals (no model, no compilation)."""

import json
import math

import accuracy_intervals
import numpy as np
import pytest

from deepseek_jax.rl import rewards, tasks
from deepseek_jax.rl.tasks import Example

EX = Example("12+30=", "42")


@pytest.mark.parametrize("completion, parsed", [
    ("<think>24</think><answer>42</answer>", "42"),
    ("<answer> 42 \n</answer>", "42"),  # Whitespace inside the tags.
    ("So the answer is <answer>42</answer>, done. Thanks!", "42"),  # Extra text around.
    ("<answer>41</answer> no wait <answer>42</answer>", "42"),  # The final answer counts.
    ("<answer>1<answer>42</answer>", "42"),  # A stray opening tag: the innermost complete pair.
    ("<answer>42", None),  # Unclosed.
    ("42</answer>", None),  # Never opened.
    ("<answer>42</answr>", None),  # Misspelt closing tag.
    ("the answer is 42", None),  # No tags at all.
    ("", None),
    ("<answer></answer>", ""),
])
def test_parse_answer(completion, parsed):
    assert rewards.parse_answer(completion) == parsed


@pytest.mark.parametrize("completion, reward", [
    ("<think>24</think><answer>42</answer>", 1.0),
    ("<answer>042</answer>", 1.0),  # Numerals compare by value.
    ("<answer>42.0</answer>", 1.0),
    ("<answer>43</answer>", 0.0),
    ("<answer>4 2</answer>", 0.0),
    ("<answer>forty-two</answer>", 0.0),
    ("<answer>nan</answer>", 0.0),
    ("<answer>42", 0.0),  # Missing answer: 0, not an error.
    ("", 0.0),
])
def test_accuracy_reward(completion, reward):
    assert rewards.accuracy_reward(EX.prompt, completion, EX) == reward


def test_accuracy_reward_compares_text_answers_and_big_integers_exactly():
    assert rewards.accuracy_reward("", "<answer> Paris</answer>", Example("capital?", "Paris")) == 1.0
    assert rewards.accuracy_reward("", "<answer>paris</answer>", Example("capital?", "Paris")) == 0.0
    big = Example("?", str(10 ** 17 + 1))
    assert rewards.accuracy_reward("", f"<answer>{10 ** 17}</answer>", big) == 0.0  # float64 would say equal.


@pytest.mark.parametrize("completion, reward", [
    ("<think>24</think><answer>42</answer>", 1.0),
    ("<think>\nadd the tens\n</think>\n<answer>42</answer>\n", 1.0),  # Whitespace between the parts.
    ("<think></think><answer>42</answer>", 1.0),  # Empty reasoning still follows the template.
    ("<answer>42</answer>", 0.0),  # No reasoning block.
    ("<think>24</think>", 0.0),  # No answer.
    ("<answer>42</answer><think>24</think>", 0.0),  # Wrong order.
    ("<think>24</think><answer>42</answer> and more", 0.0),  # Text after the answer.
    ("intro <think>24</think><answer>42</answer>", 0.0),  # Text before the reasoning.
    ("<think>24</think><answer>42</answer><answer>42</answer>", 0.0),  # Two answers.
    ("<think>2<think>4</think><answer>42</answer>", 0.0),  # A repeated tag.
    ("<think>24<answer>42</answer>", 0.0),  # Reasoning never closed.
    ("<think>24</think><answer>42", 0.0),  # Answer never closed.
])
def test_format_reward(completion, reward):
    assert rewards.format_reward(EX.prompt, completion, EX) == reward


def test_registry_weights_and_errors():
    weights = {"accuracy": 1.0, "format": 0.5}
    fns = rewards.resolve(weights)
    values = rewards.score(fns, [EX.prompt] * 3, ["<think>x</think><answer>42</answer>", "<answer>42</answer>", "?"],
                           [EX] * 3)
    np.testing.assert_array_equal(values["accuracy"], [1, 1, 0])
    np.testing.assert_array_equal(values["format"], [1, 0, 0])
    np.testing.assert_array_equal(rewards.combine(values, weights), [1.5, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"unknown rewards \['nope'\].*registered"):
        rewards.resolve({"nope": 1.0})
    with pytest.raises(ValueError, match="rl.rewards.format"):
        rewards.resolve({"format": float("nan")})
    with pytest.raises(ValueError, match="reward_modules.*no_such_module"):
        rewards.import_reward_modules("no_such_module")


def test_a_failing_reward_is_an_error_naming_it():
    @rewards.register("test_divides")
    def divides(prompt, completion, example):
        return 1.0 / len(completion)

    @rewards.register("test_nan")
    def not_a_number(prompt, completion, example):
        return math.nan

    with pytest.raises(rewards.RewardError, match=r"reward 'test_divides' raised ZeroDivisionError.*completion ''"):
        rewards.score({"test_divides": divides}, [EX.prompt], [""], [EX])
    with pytest.raises(rewards.RewardError, match=r"reward 'test_nan' returned nan"):
        rewards.score({"test_nan": not_a_number}, [EX.prompt], ["x"], [EX])
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("accuracy")(divides)


def test_arithmetic_task_is_correct_seeded_and_keeps_held_out_prompts_out():
    task = tasks.Arithmetic(digits=2, operations="+-", seed=3, num_eval=300)
    train = task.train_examples(0, 2000)
    for e in train[:200] + task.eval_examples[:200]:
        a, op, b = e.prompt[:-1].partition("+") if "+" in e.prompt else e.prompt[:-1].partition("-")
        assert int(e.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        padded = f"{int(e.answer):03d}"  # Fixed width: digits + 1.
        assert e.prompt[:2].isdigit() and e.prompt[3:5].isdigit()  # Zero-padded operands.
        assert e.solution.endswith(f"</think><answer>{padded}</answer>")
        # Column arithmetic, units first: (carry or borrow out, result digit) per column.
        assert e.solution == f"<think>{tasks.column_reasoning(int(a), int(b), op, 2)}</think><answer>{padded}</answer>"
        assert e.solution[7:11][1::2] == padded[:0:-1] and e.solution[9] == padded[0]  # Read back.
        assert rewards.accuracy_reward(e.prompt, e.solution, e) == rewards.format_reward(e.prompt, e.solution, e) == 1
    assert len({e.prompt for e in task.eval_examples}) == 300
    assert not {e.prompt for e in train} & {e.prompt for e in task.eval_examples}
    with_test = tasks.Arithmetic(digits=2, operations="+-", seed=3, num_eval=300, num_test=200)
    assert with_test.eval_examples == task.eval_examples and len(with_test.test_examples) == 200
    held_out = {e.prompt for e in with_test.eval_examples + with_test.test_examples}
    with_test_train = with_test.train_examples(0, 2000)
    assert len(held_out) == 500 and not {e.prompt for e in with_test_train} & held_out
    # Holding out the test prompts replaces only the training problems that were test prompts.
    test_prompts = {e.prompt for e in with_test.test_examples}
    changed = [i for i, (x, y) in enumerate(zip(train, with_test_train)) if x != y]
    assert changed and all(train[i].prompt in test_prompts for i in changed)
    assert tasks.column_reasoning(347, 586, "+", 3) == "131309" and tasks.column_reasoning(47, 5, "-", 3) == "020400"
    assert tasks.column_reasoning(40, 5, "-", 2) == "1503"  # 0-5 borrows: 15 - 10 x 1 = 5; 4-0-1 = 3.
    again = tasks.Arithmetic(digits=2, operations="+-", seed=3, num_eval=300)
    assert again.train_examples(1000, 5) == task.train_examples(1000, 5)  # A pure function of (seed, index).
    assert task.train_examples(0, 5) == train[:5] and task.train_examples(5, 5) == train[5:10]
    assert task.train_examples(0, 5, stream=1) != train[:5]
    assert tasks.Arithmetic(2, "+-", 4, 300).eval_examples != task.eval_examples
    with pytest.raises(ValueError, match="rl.task.num_eval"):
        tasks.Arithmetic(digits=1, operations="+", seed=0, num_eval=60)
    with pytest.raises(ValueError, match="rl.task.num_eval \\+ num_test"):
        tasks.Arithmetic(digits=1, operations="+", seed=0, num_eval=30, num_test=30)
    with pytest.raises(ValueError, match="rl.task.operations"):
        tasks.Arithmetic(digits=2, operations="*", seed=0, num_eval=10)


def test_jsonl_task_reads_prompts_and_names_bad_lines(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text('{"prompt": "2+2=", "answer": 4}\n\n{"prompt": "capital of France?", "answer": "Paris"}\n')
    task = tasks.JsonlTask(str(good), str(good), seed=0, num_eval=0)
    assert [e.answer for e in task.eval_examples] == ["4", "Paris"]
    assert sorted(e.prompt for e in task.train_examples(0, 2)) == ["2+2=", "capital of France?"]  # One pass.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2=", "answer": 4}\n{"question": "2+3="}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a non-empty string \"prompt\""):
        tasks.JsonlTask(str(bad), str(good), seed=0, num_eval=0)
    with pytest.raises(ValueError, match="rl.task.eval_path"):
        tasks.JsonlTask(str(good), str(tmp_path / "missing.jsonl"), seed=0, num_eval=0)


def test_sft_jsonl_is_what_the_trainer_reads(tmp_path):
    task = tasks.Arithmetic(digits=2, operations="+", seed=0, num_eval=10)
    path = tmp_path / "sft.jsonl"
    tasks.write_sft_jsonl(task.train_examples(0, 3), str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["text"] for x in lines] == [e.prompt + e.solution for e in task.train_examples(0, 3)]


def test_intervals():
    lo, hi = accuracy_intervals.wilson_interval(np.array([True] * 50 + [False] * 50))
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)  # Textbook value.
    lo, hi = accuracy_intervals.wilson_interval(np.ones(20, bool))
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.8389, abs=1e-4)  # Stays inside [0, 1] where p = 1.
    before = np.array([0, 0, 1, 1, 0, 1, 0, 0] * 25, bool)
    after = np.array([1, 0, 1, 1, 1, 1, 0, 1] * 25, bool)
    gain, lo, hi = accuracy_intervals.paired_gain_interval(after, before)
    d = np.array([1, 0, 0, 0, 1, 0, 0, 1] * 25, float)
    assert gain == pytest.approx(3 / 8)
    assert hi - gain == pytest.approx(gain - lo) == pytest.approx(1.959964 * d.std(ddof=1) / np.sqrt(200))
