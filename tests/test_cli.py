"""The command-line mains' errors: one message naming the flag or the path, exit code 1, no traceback."""

import os
import subprocess
import sys

import pytest
from common import ROOT

from deepseek_jax import cli


def run_main(module: str, *flags: str, env: dict | None = None) -> tuple[int, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
    done = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.train.stepz=3", "--config.train.stepz: config.train has no field 'stepz'; "
                               "did you mean --config.train.steps?"),
    ("--config.trian.steps=3", "--config.trian.steps: config has no field 'trian'; "
                               "did you mean --config.train.steps?"),
    ("--config.model.zzz=1", "--config.model.zzz: config.model has no field 'zzz'"),
])
def test_an_unknown_config_key_is_one_line_naming_the_flag_and_the_closest_field(override, message):
    code, output = run_main("deepseek_jax.params", "--config=configs/tiny.py", override)
    assert code == 1
    assert output.strip().splitlines() == [f"Error: {message}"]


def test_a_bad_flag_value_is_absls_one_line():
    code, output = run_main("deepseek_jax.params", "--config=configs/tiny.py", "--config.train.steps=abc")
    assert code == 1
    assert output.strip().splitlines()[0].startswith("FATAL Flags parsing error: flag --config.train.steps=abc")
    assert "Traceback" not in output


def test_a_project_error_in_any_main_is_one_message_and_the_variable_shows_the_traceback(tmp_path):
    flags = ("--config=configs/tiny.py", f"--workdir={tmp_path / 'missing'}")
    code, output = run_main("deepseek_jax.evaluate", *flags)
    assert code == 1 and "Traceback" not in output
    lines = output.strip().splitlines()
    assert lines[-2].startswith(f"Error: --workdir='{tmp_path / 'missing'}' is neither a training run")
    assert lines[-1] == "(set DEEPSEEK_JAX_TRACEBACK=1 to see where it was raised)"

    code, output = run_main("deepseek_jax.evaluate", *flags, env={cli.TRACEBACK_VARIABLE: "1"})
    assert code == 1 and "Traceback" in output and "CheckpointError" in output


def test_other_errors_raised_while_parsing_are_not_taken_for_unknown_keys():
    assert cli.unknown_override_message(["main", "--config.train.steps=3"], AttributeError("no attribute x")) is None
    assert cli.unknown_override_message(["main", "--workdir=a"], KeyError("'steps'")) is None
