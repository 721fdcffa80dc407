"""Runs one program as N cooperating JAX processes on this machine (multi-host training, tested locally).

    python -m deepseek_jax.parallel.launch --processes=2 --devices_per_process=4 -- \
        -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/tiny_2proc \
        --config.parallel.data=2 --config.parallel.expert=4

Each child gets $DEEPSEEK_JAX_COORDINATOR (a free localhost port), $DEEPSEEK_JAX_NUM_PROCESSES,
$DEEPSEEK_JAX_PROCESS_ID and its own simulated CPU devices; programs call
`deepseek_jax.parallel.distributed.initialize()` (the train main does). If one process fails the others
are stopped, and the exit code is the first failure's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from absl import app, flags

from deepseek_jax.parallel import distributed

_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Simulated CPU devices per process.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(process_id: int, processes: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update({
        "XLA_FLAGS": " ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices}"]),
        "JAX_PLATFORMS": "cpu",
        distributed.COORDINATOR_ENV: f"localhost:{port}",
        distributed.NUM_PROCESSES_ENV: str(processes),
        distributed.PROCESS_ID_ENV: str(process_id),
    })
    return env


def launch(program: list[str], processes: int, devices_per_process: int) -> int:
    """Starts `python <program>` `processes` times and waits for all. Returns the exit code."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"--processes={processes} and --devices_per_process={devices_per_process} must be >= 1.")
    port = free_port()
    children = [subprocess.Popen([sys.executable, *program], env=child_env(i, processes, devices_per_process, port))
                for i in range(processes)]
    failed = 0
    while True:
        codes = [c.poll() for c in children]
        failed = next((code for code in codes if code not in (None, 0)), 0)
        if failed or all(code is not None for code in codes):
            break
        time.sleep(0.2)
    for c in children:
        if c.poll() is None:
            c.terminate()
    codes = [c.wait() for c in children]
    return failed or next((code for code in codes if code), 0)


def main(argv: list[str]) -> None:
    program = argv[1:]
    if not program:
        raise app.UsageError("give the program after '--', e.g. -- -m deepseek_jax.train --config=...")
    sys.exit(launch(program, _PROCESSES.value, _DEVICES.value))


if __name__ == "__main__":
    app.run(main)
