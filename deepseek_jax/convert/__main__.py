"""Converts between a Hugging Face DeepSeek checkpoint and an orbax checkpoint in a workdir.

    python -m deepseek_jax.convert --hf_path=/ckpt/DeepSeek-V3 --workdir=runs/v3
    python -m deepseek_jax.convert --direction=export --workdir=runs/v3 --hf_path=/out/v3 --dtype=bfloat16
"""

import jax
from absl import app, flags, logging

from deepseek_jax import cli, convert

_HF_PATH = flags.DEFINE_string("hf_path", None, "Hugging Face checkpoint directory (read on import, written "
                               "on export).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding (or receiving) hf_import/.")
_DIRECTION = flags.DEFINE_enum("direction", "import", ["import", "export"], "import: HF -> workdir; "
                               "export: workdir -> HF.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float8_e4m3fn"], "import: parameter dtype "
                           "(default float32); export: storage dtype (default float32).")


def main(argv: list[str]) -> None:
    del argv
    logging.info("JAX devices: %s", jax.devices())
    if _DIRECTION.value == "import":
        if _DTYPE.value == "float8_e4m3fn":
            raise app.UsageError("--dtype=float8_e4m3fn is an export format; import as float32 or bfloat16.")
        convert.hf_to_workdir(_HF_PATH.value, _WORKDIR.value, dtype=_DTYPE.value or "float32")
    else:
        convert.workdir_to_hf(_WORKDIR.value, _HF_PATH.value, dtype=_DTYPE.value or "float32")


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_path", "workdir"])
    cli.run(main)
