"""Hugging Face DeepSeek-V3/R1/V3.2/V2 checkpoints <-> deepseek_jax variables (incl. FP8 block-scaled weights).

    cfg, variables = convert.load_checkpoint("/ckpt/DeepSeek-V3", mesh=mesh, rules=rules)
    convert.save_checkpoint(cfg, variables, "/out/hf", dtype="float8_e4m3fn")

`python -m deepseek_jax.convert --hf_path=... --workdir=...` imports into an orbax checkpoint a trainer can
fine-tune from (`load_workdir`); `--direction=export` writes it back.
"""

from deepseek_jax.convert.hf_config import CheckpointFormat, from_hf, to_hf
from deepseek_jax.convert.hf_export import EXPORT_DTYPES, quantize_exact, save_checkpoint
from deepseek_jax.convert.hf_import import load_checkpoint
from deepseek_jax.convert.workdir import SUBDIR, hf_to_workdir, load_workdir, workdir_to_hf

__all__ = ["CheckpointFormat", "EXPORT_DTYPES", "SUBDIR", "from_hf", "hf_to_workdir", "load_checkpoint", "load_workdir",
           "quantize_exact", "save_checkpoint", "to_hf", "workdir_to_hf"]
