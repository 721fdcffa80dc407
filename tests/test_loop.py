"""The run loop every job shares, driven by a counting step (no model): cadences, rows, NaN stop, resume."""

import os

import numpy as np
import pytest
from common import read_rows

from deepseek_jax.train.loop import RunLoop, TrainingStopped


class Job:
    """A fake job: step i reports loss i (a NumPy array, as a device value would be) and records what ran."""

    def __init__(self, bad_from=None):
        self.events, self.bad_from = [], bad_from

    def step(self, i):
        self.events.append(("step", i + 1))
        bad = self.bad_from is not None and i + 1 >= self.bad_from
        return {"loss": np.float32(i + 1), "per_layer": np.array([i, 2 * i], np.float32),
                "finite": np.bool_(not bad), "bad_steps": np.int32(i + 2 - self.bad_from if bad else 0)}

    def evaluate(self):
        self.events.append(("eval", len([e for e in self.events if e[0] == "step"])))
        return {"eval_score": float(len(self.events))}

    def save(self, step, force):
        self.events.append(("save", step, force))
        return f"ckpt/{step}"


def run(workdir, job, start=0, steps=6, **kwargs):
    loop = RunLoop(str(workdir), name="test", steps=steps, eval_every=kwargs.pop("eval_every", 3),
                   log_every=kwargs.pop("log_every", 2), checkpoint_every=kwargs.pop("checkpoint_every", 4),
                   max_bad_steps=kwargs.pop("max_bad_steps", 2), lead=True, **kwargs)
    return loop.run(start, step=job.step, evaluate=job.evaluate, save=job.save,
                    postfix=lambda host: {"loss": f"{host['loss']:.1f}"}, describe_eval=str)


def test_cadences_rows_and_summary(tmp_path):
    job, plotted = Job(), []
    summary = run(tmp_path, job, plots=[plotted.append])
    assert [e for e in job.events if e[0] != "step"] == [
        ("eval", 0), ("eval", 3), ("save", 4, False), ("eval", 6), ("save", 6, False)]
    rows = read_rows(tmp_path)
    # Step 0's evaluation, then every log_every-th step and every evaluated step (with its evaluation).
    assert [int(r["step"]) for r in rows] == [0, 2, 3, 4, 6]
    by_step = {int(r["step"]): r for r in rows}
    assert by_step[3]["eval_score"] != "" and by_step[2]["eval_score"] == "" and by_step[3]["loss"] == "3.0"
    assert by_step[4]["per_layer_1"] == "6.0" and "finite" not in rows[0] and by_step[6]["step_seconds"] != ""
    assert summary["start_step"] == 0 and summary["steps"] == 6 and not summary["interrupted"]
    assert summary["initial_eval_score"] < summary["final_eval_score"]
    assert plotted == [os.path.join(str(tmp_path), "metrics.csv")]


def test_resumed_run_keeps_rows_and_skips_the_first_evaluation(tmp_path):
    run(tmp_path, Job(), steps=4)
    job = Job()
    summary = run(tmp_path, job, start=4, steps=6)
    assert job.events[0] == ("step", 5) and "initial_eval_score" not in summary
    assert [int(r["step"]) for r in read_rows(tmp_path)] == [0, 2, 3, 4, 6]


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    """Steps 3 and 4 are non-finite: step 4's metrics, read while step 5 runs, stop the run."""
    job = Job(bad_from=3)
    with pytest.raises(TrainingStopped, match=r"2 consecutive steps with a NaN/Inf loss or gradient \(up to step 4"):
        run(tmp_path, job, max_bad_steps=2, eval_every=100, checkpoint_every=100, steps=20)
    assert [e for e in job.events if e[0] == "step"][-1] == ("step", 5)
