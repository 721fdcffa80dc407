"""Prints a run's memory plan per device, from shapes and shardings only (train/memory.py).

    python -m deepseek_jax.plan --config=configs/deepseek_v3.py --config.parallel.stage=16 \
        --config.parallel.expert=64 --config.parallel.data=2 --config.parallel.pipeline=dualpipe \
        --config.data.seq_len=4096 --config.data.batch_size=15360 --config.parallel.microbatches=120
"""

import json

from absl import flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.train.memory import plan_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print the plan as JSON (bytes per device).")


def main(argv: list[str]) -> None:
    del argv
    plan = plan_memory(_CONFIG.value)
    if _JSON.value:
        as_dict = lambda lines: {line.name: line.bytes for line in lines}  # noqa: E731
        print(json.dumps({"layout": plan.layout, "lines": as_dict(plan.lines), "total": plan.total,
                          "stash": as_dict(plan.stash_lines), "notes": list(plan.notes)}, indent=1))
    else:
        print(plan.format())


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
