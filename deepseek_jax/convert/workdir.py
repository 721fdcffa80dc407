"""Hugging Face checkpoint <-> an orbax checkpoint in a workdir (what `python -m deepseek_jax.convert` does).

Layout written under `<workdir>/hf_import/`:
    variables/           orbax StandardCheckpointer: {'params': ..., 'routing': ...}
    model_config.json    ModelConfig.to_dict() (HF key names; plus dtype/moe_dispatch/remat)
    hf_config.json       the source checkpoint's config.json (token ids, rope style; used by export)
    hf_files/            the source's tokenizer and generation files, copied verbatim

A trainer fine-tunes from it with `load_workdir(workdir, shardings=...)`, which restores the variables
straight into the given shardings.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from deepseek_jax.convert.hf_export import save_checkpoint
from deepseek_jax.convert.hf_import import load_checkpoint
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.functional import abstract_variables

SUBDIR = "hf_import"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "tokenizer.model")


def _root(workdir: str) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / SUBDIR


def hf_to_workdir(hf_path: str, workdir: str, *, dtype: Any = jnp.float32) -> pathlib.Path:
    """Imports `hf_path` and saves it under `<workdir>/hf_import/`. Returns that directory."""
    cfg, variables = load_checkpoint(hf_path, dtype=dtype)
    root = _root(workdir)
    if root.exists():
        raise ValueError(f"{root} already exists; remove it or choose another workdir.")
    root.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(root / "variables", variables)
    checkpointer.wait_until_finished()
    (root / "model_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    source = pathlib.Path(hf_path)
    shutil.copyfile(source / "config.json", root / "hf_config.json")
    (root / "hf_files").mkdir()
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, root / "hf_files" / name)
    logging.info("Wrote %s.", root)
    return root


def load_workdir(workdir: str, shardings: Any = None) -> tuple[ModelConfig, dict]:
    """(model_config, variables) saved by `hf_to_workdir`, restored into `shardings` (a pytree matching
    the variables, or None for the default device)."""
    root = _root(workdir)
    if not (root / "model_config.json").is_file():
        raise ValueError(f"{root} holds no imported checkpoint; run python -m deepseek_jax.convert "
                         f"--hf_path=... --workdir={workdir} first.")
    cfg = ModelConfig.from_dict(json.loads((root / "model_config.json").read_text()))
    target = abstract_variables(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    variables = ocp.StandardCheckpointer().restore(root / "variables", target)
    return cfg, variables


def workdir_to_hf(workdir: str, hf_path: str, *, dtype: str = "float32") -> None:
    """Exports the variables saved by `hf_to_workdir` as a Hugging Face checkpoint in `hf_path`."""
    cfg, variables = load_workdir(workdir)
    root = _root(workdir)
    base = json.loads((root / "hf_config.json").read_text()) if (root / "hf_config.json").is_file() else None
    save_checkpoint(cfg, variables, hf_path, dtype=dtype, base_config=base)
    for name in SIDE_FILES:
        if (root / "hf_files" / name).is_file():
            shutil.copyfile(root / "hf_files" / name, pathlib.Path(hf_path) / name)
    logging.info("Wrote %s.", hf_path)
