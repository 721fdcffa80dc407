"""Faults injected into real training runs (subprocesses of `python -m deepseek_jax.train`).

A kill is a real SIGKILL, sent by the run's process to itself at a chosen call inside orbax's save (a
wrapper around the function, installed before the train main starts), so that it lands at the same point
of the save every time instead of at a random moment.

A write that fails is made by the operating system, not by a mock: the run's process gets a file-size
limit (RLIMIT_FSIZE, with SIGXFSZ ignored) below the size of a checkpoint's array files and above that
of its metrics, so every checkpoint write fails with EFBIG ("File too large") the way a full disk fails
with ENOSPC; unlike permissions, the limit holds for root too.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from common import ROOT, losses_by_step, micro_run_config

from deepseek_jax.train.evaluation import evaluate_checkpoint

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


# Run a Python command with file permissions binding even root: argv[1:] = the command's arguments after
# the interpreter. A root process loses CAP_DAC_OVERRIDE from its bounding set (prctl PR_CAPBSET_DROP), so the
# interpreter it execs has no override of permissions (it keeps the right to read, which other capabilities
# grant). Done in a fresh process rather than in a preexec_fn, which is unsafe in the threaded test process.
PERMISSIONS_MAIN = """
import ctypes, os, sys
if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # CAP_DAC_OVERRIDE = 1
    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def run(command, timeout: float = 240, permissions: bool = False) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds) of `command` (a Python command); `permissions`: file permissions
    bind even root."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    if permissions:
        command = [sys.executable, "-c", PERMISSIONS_MAIN, *command[1:]]
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.time() - start


def committed_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def files_of(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def saved_digests(workdir, step: int) -> dict:
    """The digests of every array and of the iterator state recorded with `step` (train/digest.py)."""
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())["digests"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 4-step run saving at steps 2 and 4; the tests resume copies of it (their runs use
    its corpus, so that their data matches)."""
    tmp = tmp_path_factory.mktemp("reference")
    code, output, _ = run(train_command(tmp, tmp / "run", steps=4))
    assert code == 0, output[-3000:]
    assert committed_steps(tmp / "run") == [2, 4]
    return tmp


def copy_at_step_2(reference, workdir):
    """The reference run as a kill after the commit of step 2 would leave it."""
    shutil.copytree(reference / "run", workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")


def test_a_save_that_cannot_be_written_stops_the_run_with_one_message(reference_run, tmp_path):
    """Step 2 is committed; resumed with writes failing, the save of step 4 stops the run within seconds,
    exit code 1, the last line names the path and the cause (no thread prints a traceback), step 2 is
    untouched; with room again the run resumes and ends as the uninterrupted one, bit for bit."""
    workdir = tmp_path / "run"
    copy_at_step_2(reference_run, workdir)
    before = files_of(workdir / "checkpoints" / "2")

    code, output, _ = run(train_command(reference_run, workdir, steps=4, file_limit=FILE_LIMIT))
    last = output.strip().splitlines()[-1]
    assert code == 1, output[-3000:]
    assert last.startswith("Training stopped: could not save"), output[-3000:]
    assert "Traceback" not in output and "Event loop is closed" not in output, output[-3000:]
    assert str(workdir / "checkpoints" / "4") in last and "File too large" in last
    assert f"the last committed checkpoint is {workdir / 'checkpoints' / '2'}, untouched" in last
    assert committed_steps(workdir) == [2]
    assert files_of(workdir / "checkpoints" / "2") == before

    code, output, _ = run(train_command(reference_run, workdir, steps=4))  # the disk has room again
    assert code == 0, output[-3000:]
    assert "Resumed from" in output and committed_steps(workdir) == [2, 4]
    assert losses_by_step(workdir) == losses_by_step(reference_run / "run")
    assert saved_digests(workdir, 4) == saved_digests(reference_run / "run", 4)


# Run the train main, SIGKILLed at a call of an orbax function: argv[1] = "module:qualname" of the function
# (a coroutine function), argv[2] = "before" or "after" the call, argv[3] = the path of step 4's temporary
# directory; the kill comes at the first call made while that directory exists (for a call whose first
# argument is a path: the first call on that directory). The rest = the train main's flags.
KILLED_MAIN = """
import functools, importlib, os, runpy, signal, sys
target, when, step_dir = sys.argv.pop(1), sys.argv.pop(1), sys.argv.pop(1)
module, qualname = target.split(":")
owner = importlib.import_module(module)
*parents, name = qualname.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original = getattr(owner, name)

def armed(args):
    if args and isinstance(args[0], os.PathLike):
        return os.fspath(args[0]) == step_dir
    return os.path.isdir(step_dir)

@functools.wraps(original)
async def killing(*args, **kwargs):
    kill = armed(args)
    if kill and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = await original(*args, **kwargs)
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, killing)
sys.argv[0] = "deepseek_jax.train"
runpy.run_module("deepseek_jax.train", run_name="__main__", alter_sys=True)
"""
HANDLER = "orbax.checkpoint._src.handlers.base_pytree_checkpoint_handler:BasePyTreeCheckpointHandler"
KILL_POINTS = {  # where step 4's save is killed: (function, before/after, the steps committed after the kill)
    "while step 4's arrays are written": (f"{HANDLER}._write_metadata_after_commits", "before", [2]),
    "step 4 written, before it is renamed into place": ("orbax.checkpoint._src.path.async_path:rename",
                                                        "before", [2]),
    "just after step 4 is renamed into place": ("orbax.checkpoint._src.path.async_path:rename", "after", [2, 4]),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_during_a_save_loses_no_committed_step_and_resumes_bit_for_bit(reference_run, tmp_path,
                                                                                     point):
    """SIGKILL at three points of step 4's save: the committed steps are intact, the latest one holds the
    uninterrupted run's state (the same digests, recomputed from the restored arrays when it is read) and
    the same validation loss; from the earliest point, the resumed run ends as the uninterrupted one."""
    target, when, committed = KILL_POINTS[point]
    workdir, reference = tmp_path / "run", reference_run / "run"
    copy_at_step_2(reference_run, workdir)
    before = files_of(workdir / "checkpoints" / "2")
    killed = [sys.executable, "-c", KILLED_MAIN, target, when, str(workdir / "checkpoints" / "4.orbax-checkpoint-tmp"),
              *train_command(reference_run, workdir, steps=4)[3:]]
    code, output, _ = run(killed)
    assert code == -signal.SIGKILL, output[-3000:]
    assert committed_steps(workdir) == committed
    assert files_of(workdir / "checkpoints" / "2") == before
    latest = committed[-1]
    assert saved_digests(workdir, latest) == saved_digests(reference, latest)
    config = micro_run_config(reference_run, steps=4, ema_decay=0.9)
    assert evaluate_checkpoint(config, str(workdir)) == evaluate_checkpoint(config, str(reference), step=latest)

    if point == next(iter(KILL_POINTS)):
        code, output, _ = run(train_command(reference_run, workdir, steps=4))
        assert code == 0, output[-3000:]
        assert f"Resumed from {workdir / 'checkpoints' / '2'}." in output
        assert committed_steps(workdir) == [2, 4]
        assert losses_by_step(workdir) == losses_by_step(reference)
        assert saved_digests(workdir, 4) == saved_digests(reference, 4)


def test_an_unwritable_checkpoint_directory_stops_the_run_with_one_message(reference_run, tmp_path):
    """`checkpoints/` made read-only after step 2 (root's override of permissions dropped): the save of
    step 4 stops the run with exit code 1 and one message naming the path and the cause; step 2 is
    untouched."""
    workdir = tmp_path / "run"
    copy_at_step_2(reference_run, workdir)
    before = files_of(workdir / "checkpoints" / "2")
    (workdir / "checkpoints").chmod(0o555)
    try:
        code, output, _ = run(train_command(reference_run, workdir, steps=4), permissions=True)
    finally:
        (workdir / "checkpoints").chmod(0o755)
    last = output.strip().splitlines()[-1]
    assert code == 1, output[-3000:]
    assert last.startswith("Training stopped: could not save"), output[-3000:]
    assert str(workdir / "checkpoints") in last and "Permission denied" in last, last
    assert "Traceback" not in output, output[-3000:]
    assert committed_steps(workdir) == [2] and files_of(workdir / "checkpoints" / "2") == before


def test_an_unwritable_metrics_file_stops_the_run_with_one_message(reference_run, tmp_path):
    """metrics.csv made read-only (holding the rows up to step 2, so that the resumed run appends to it
    rather than rewriting it beside): the first row the resumed run writes stops it with exit code 1 and one
    message naming the file; the committed checkpoint is untouched."""
    workdir = tmp_path / "run"
    copy_at_step_2(reference_run, workdir)
    before = files_of(workdir / "checkpoints" / "2")
    metrics = workdir / "metrics.csv"
    header, *rows = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(header + "".join(row for row in rows if int(row.split(",")[0]) <= 2))
    metrics.chmod(0o444)
    code, output, _ = run(train_command(reference_run, workdir, steps=4), permissions=True)
    last = output.strip().splitlines()[-2:]
    assert code == 1, output[-3000:]
    assert last[0] == f"Error: [Errno 13] Permission denied: '{workdir / 'metrics.csv'}'", output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert committed_steps(workdir) == [2] and files_of(workdir / "checkpoints" / "2") == before


def test_a_workdir_that_is_a_file_is_one_line_of_error(tmp_path):
    workdir = tmp_path / "a_file"
    workdir.write_text("not a directory")
    code, output, _ = run(train_command(tmp_path, workdir, steps=2))
    assert code == 1
    assert output.strip().splitlines()[-2] == (f"Error: --workdir={workdir}: {workdir} is a file, not a directory; "
                                                "pass a directory (new or a run's).")
    assert "Traceback" not in output
