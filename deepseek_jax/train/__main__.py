"""Trains a DeepSeek-V3-style model.

    python -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=...]
    python -m deepseek_jax.train --config=configs/tiny_pipeline.py --workdir=runs/pipeline --cpu_devices=8

Several processes (hosts) train together when given --coordinator_address, --num_processes and
--process_id (or the $DEEPSEEK_JAX_* variables that `python -m deepseek_jax.parallel.launch` sets).
"""


import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.parallel import distributed
from deepseek_jax.train.checkpoint import CheckpointError
from deepseek_jax.train.loop import TrainingStopped
from deepseek_jax.train.pretrain import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: process 0's host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Split the CPU into this many simulated devices "
                                    "(jax_num_cpu_devices), to run meshes and pipelines on one machine.")


def main(argv: list[str]) -> None:
    del argv
    if _CPU_DEVICES.value is not None:
        if _CPU_DEVICES.value < 1:
            raise app.UsageError(f"--cpu_devices={_CPU_DEVICES.value}: use an integer >= 1.")
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)  # Before any backend starts.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() == 0:
        print(f"JAX devices: {jax.devices()} ({jax.process_count()} process(es))")
    logging.set_verbosity(logging.WARNING)  # Keep orbax's per-save INFO lines out of the progress view.
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (CheckpointError, TrainingStopped) as e:  # the run's own verdicts (other errors: see cli.run)
        cli.stop(f"Training stopped: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
