"""Faults injected into real training runs (subprocesses of `python -m deepseek_jax.train`).

A write that fails is made by the operating system, not by a mock: the run's process gets a file-size
limit (RLIMIT_FSIZE, with SIGXFSZ ignored) below the size of a checkpoint's array files and above that
of its metrics, so every checkpoint write fails with EFBIG ("File too large") the way a full disk fails
with ENOSPC; unlike permissions, the limit holds for root too.
"""

import os
import subprocess
import sys
import time

import numpy as np
from common import ROOT, micro_run_config

# Run with a file-size limit: argv[1] = limit in bytes, the rest = the train main's flags.
LIMITED_MAIN = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "deepseek_jax.train"
runpy.run_module("deepseek_jax.train", run_name="__main__", alter_sys=True)
"""
FILE_LIMIT = 40_000  # bytes: the micro run's metrics and event files stay below, its array files do not


def train_command(tmp_path, workdir, steps: int, file_limit: int | None = None) -> list[str]:
    c = micro_run_config(tmp_path, steps=steps, eval_every=1000, ema_decay=0.9)
    c.checkpoint.every = 2
    flags = [f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}"]
    flags += [f"--config.{group}.{k}={v}" for group in ("model", "data", "train", "checkpoint")
              for k, v in c[group].items() if v is not None and not isinstance(v, dict)]
    if file_limit is None:
        return [sys.executable, "-m", "deepseek_jax.train", *flags]
    return [sys.executable, "-c", LIMITED_MAIN, str(file_limit), *flags]


def run(command, timeout: float = 240) -> tuple[int, str, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.time() - start


def committed_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def test_a_save_that_cannot_be_written_stops_the_run_with_one_message(tmp_path):
    """Step 2 is committed; resumed with writes failing, the save of step 4 stops the run within seconds,
    exit code 1, the last line names the path and the cause (no thread prints a traceback), step 2 is
    untouched and still resumes."""
    workdir = tmp_path / "run"
    code, output, _ = run(train_command(tmp_path, workdir, steps=2))
    assert code == 0, output
    assert committed_steps(workdir) == [2]
    before = {p: p.read_bytes() for p in (workdir / "checkpoints" / "2").rglob("*") if p.is_file()}

    code, output, seconds = run(train_command(tmp_path, workdir, steps=4, file_limit=FILE_LIMIT))
    last = output.strip().splitlines()[-1]
    assert code == 1, output[-3000:]
    assert last.startswith("Training stopped: could not save"), output[-3000:]
    assert "Traceback" not in output and "Event loop is closed" not in output, output[-3000:]
    assert str(workdir / "checkpoints" / "4") in last and "File too large" in last
    assert f"the last committed checkpoint is {workdir / 'checkpoints' / '2'}, untouched" in last
    assert committed_steps(workdir) == [2]
    assert {p: p.read_bytes() for p in (workdir / "checkpoints" / "2").rglob("*") if p.is_file()} == before

    code, output, _ = run(train_command(tmp_path, workdir, steps=4))  # the disk has room again
    assert code == 0, output[-3000:]
    assert "Resumed from" in output and committed_steps(workdir) == [2, 4]
    assert np.isfinite(float(open(workdir / "summary.json").read().split('"final_eval_bpb": ')[1].split(",")[0]))


def test_a_workdir_that_is_a_file_is_one_line_of_error(tmp_path):
    workdir = tmp_path / "a_file"
    workdir.write_text("not a directory")
    code, output, _ = run(train_command(tmp_path, workdir, steps=2))
    assert code == 1
    assert output.strip().splitlines()[-2] == (f"Error: --workdir={workdir}: {workdir} is a file, not a directory; "
                                                "pass a directory (new or a run's).")
    assert "Traceback" not in output
