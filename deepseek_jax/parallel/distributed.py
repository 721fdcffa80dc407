"""Joining a multi-process run (JAX's multi-controller runtime) from flags or environment variables.

Every process runs the same program; `jax.distributed.initialize` connects them through a coordinator
(process 0's address), after which `jax.devices()` lists the devices of all processes and one jitted
step spans them. On CPU the cross-process collectives go through gloo. `parallel/launch.py` starts N
such processes on one machine for testing.
"""

from __future__ import annotations

import os

import jax

COORDINATOR_ENV = "DEEPSEEK_JAX_COORDINATOR"  # host:port of process 0's coordinator service.
NUM_PROCESSES_ENV = "DEEPSEEK_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "DEEPSEEK_JAX_PROCESS_ID"


def _from_env(value, name: str, cast):
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return cast(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}.") from e


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the run described by the arguments, or else by $DEEPSEEK_JAX_COORDINATOR,
    $DEEPSEEK_JAX_NUM_PROCESSES and $DEEPSEEK_JAX_PROCESS_ID. Returns False (and does nothing) when
    no coordinator is given: a single-process run. Call it before any other JAX computation."""
    coordinator_address = _from_env(coordinator_address, COORDINATOR_ENV, str)
    num_processes = _from_env(num_processes, NUM_PROCESSES_ENV, int)
    process_id = _from_env(process_id, PROCESS_ID_ENV, int)
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num_processes/--process_id were given without --coordinator_address "
                             f"(or ${COORDINATOR_ENV}): give process 0's host:port.")
        return False
    if num_processes is None or process_id is None:
        raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes and --process_id "
                         f"(or ${NUM_PROCESSES_ENV} and ${PROCESS_ID_ENV}).")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    # Only the CPU backend's collectives use this (GPUs use NCCL, TPUs their interconnect).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True

