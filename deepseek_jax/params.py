"""Counts a config's parameters without allocating them.

    python -m deepseek_jax.params --config configs/deepseek_v3.py --json
"""

import json

from absl import flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.param_count import count_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print {total, activated, mtp, embedding} as JSON.")


def main(argv: list[str]) -> None:
    del argv
    counts = count_params(ModelConfig.from_dict(_CONFIG.value.model))
    if _JSON.value:
        print(json.dumps(counts))
    else:
        for name, value in counts.items():
            print(f"{name:>10}: {value:>16,d}  ({value / 1e9:.2f}B)")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
