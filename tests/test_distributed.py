"""Multi-process training: two processes x 4 devices on localhost, joined by jax.distributed, train like
one process with 8 devices; the launcher propagates failures."""

import csv
import subprocess
import sys
import textwrap

import numpy as np
from common import ROOT, micro_run_config

from deepseek_jax.train.pretrain import train_and_evaluate

TESTS = ROOT / "tests"


def setup_run(tmp_path):
    """Writes the corpus and a config file for both sides: data=2 x expert=4 over 8 devices, 5 steps,
    EMA on, checkpoint at the end."""
    micro_run_config(tmp_path)
    config_file = tmp_path / "config.py"
    config_file.write_text(textwrap.dedent(f"""
        import pathlib
        import sys

        sys.path.insert(0, {str(TESTS)!r})
        from common import micro_run_config


        def get_config():
            c = micro_run_config(pathlib.Path({str(tmp_path)!r}), write_corpus=False, steps=5, eval_every=5,
                                 ema_decay=0.9)
            c.model.update(n_routed_experts=8, n_group=2, topk_group=1)
            c.data.batch_size = 8
            c.parallel.update(data=2, expert=4)
            c.checkpoint.every = 5
            return c
    """))
    return config_file


def losses(workdir):
    with open(workdir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    return np.array([[float(r["step"]), float(r["loss"]), float(r["max_vio"])] for r in rows])


def test_two_processes_train_like_one_with_eight_devices(tmp_path):
    config_file = setup_run(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "deepseek_jax.parallel.launch", "--processes=2", "--devices_per_process=4", "--",
         "-m", "deepseek_jax.train", f"--config={config_file}", f"--workdir={tmp_path / 'two'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout

    sys.path.insert(0, str(tmp_path))
    import config as config_module  # The same config file, in this 8-device process.

    sys.path.remove(str(tmp_path))
    one = train_and_evaluate(config_module.get_config(), str(tmp_path / "one"))
    two, single = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert two.shape == single.shape == (5, 3)
    np.testing.assert_allclose(two, single, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["5"]
    import json

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    np.testing.assert_allclose(summary["final_eval_bpb"], one["final_eval_bpb"], rtol=1e-5)


def test_launcher_stops_the_others_when_one_process_fails(tmp_path):
    program = ("import os, sys, time\n"
               "sys.exit(3) if os.environ['DEEPSEEK_JAX_PROCESS_ID'] == '1' else time.sleep(120)")
    run = subprocess.run([sys.executable, "-m", "deepseek_jax.parallel.launch", "--processes=3", "--", "-c", program],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
