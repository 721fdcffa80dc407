"""Converts between a Hugging Face DeepSeek checkpoint and an orbax checkpoint in a workdir.

    python -m deepseek_jax.convert --hf_path=/ckpt/DeepSeek-V3 --workdir=runs/v3
    python -m deepseek_jax.convert --direction=export --workdir=runs/v3 --hf_path=/out/v3 --dtype=bfloat16
    python -m deepseek_jax.convert --direction=export --workdir=runs/tiny --hf_path=/out/tiny --use_ema

Export reads either kind of workdir: one this command imported into, or a training run (its latest
checkpoint, or --step; its params, or their EMA with --use_ema; train/export.py).
"""

import jax
from absl import app, flags, logging

from deepseek_jax import cli, convert
from deepseek_jax.train.export import export_training_run
from deepseek_jax.train.weights import weights_kind

_HF_PATH = flags.DEFINE_string("hf_path", None, "Hugging Face checkpoint directory (read on import, written "
                               "on export).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding (or receiving) hf_import/, or on export a "
                                "training run's workdir.")
_DIRECTION = flags.DEFINE_enum("direction", "import", ["import", "export"], "import: HF -> workdir; "
                               "export: workdir -> HF.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float8_e4m3fn"], "import: parameter dtype "
                           "(default float32); export: storage dtype (default float32).")
_STEP = flags.DEFINE_integer("step", None, "Export of a training run: the checkpoint step (default: the latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "Export of a training run: its EMA of the params.")


def main(argv: list[str]) -> None:
    del argv
    logging.info("JAX devices: %s", jax.devices())
    training_flags = _STEP.value is not None or _USE_EMA.value
    if _DIRECTION.value == "import":
        if _DTYPE.value == "float8_e4m3fn":
            raise app.UsageError("--dtype=float8_e4m3fn is an export format; import as float32 or bfloat16.")
        if training_flags:
            raise app.UsageError("--step and --use_ema choose what to export from a training run; drop them on "
                                 "import.")
        convert.hf_to_workdir(_HF_PATH.value, _WORKDIR.value, dtype=_DTYPE.value or "float32")
        return
    kind = weights_kind(_WORKDIR.value, "--workdir")
    if kind == "train":
        export_training_run(_WORKDIR.value, _HF_PATH.value, dtype=_DTYPE.value or "float32", step=_STEP.value,
                            use_ema=_USE_EMA.value)
    elif kind == "converted":
        if training_flags:
            raise app.UsageError(f"--workdir={_WORKDIR.value} holds an imported checkpoint, which has no steps and "
                                 "no EMA: drop --step and --use_ema.")
        convert.workdir_to_hf(_WORKDIR.value, _HF_PATH.value, dtype=_DTYPE.value or "float32")
    else:
        raise ValueError(f"--workdir={_WORKDIR.value} is a Hugging Face checkpoint already; export reads a "
                         "training run or a workdir this command imported into.")


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_path", "workdir"])
    cli.run(main)
