"""A training run's weights as a Hugging Face checkpoint that transformers loads.

    python -m deepseek_jax.convert --direction=export --workdir=runs/tiny --hf_path=/out/tiny [--use_ema]
        [--step=N] [--dtype=bfloat16|float8_e4m3fn]

The run's own config.json gives the model; its latest checkpoint (or `step`) the params, or their EMA.
The folder gets the safetensors shards and config.json (`convert.save_checkpoint`, with the tokenizer's end
and padding ids), and the run's tokenizer.json when it trained on one (the byte tokenizer has none).
"""

from __future__ import annotations

import logging
import pathlib
import shutil

from deepseek_jax import convert
from deepseek_jax.data import tokenizers
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train.loop import load_saved_config
from deepseek_jax.train.weights import load_weights


def export_training_run(workdir: str, hf_path: str, *, dtype: str = "float32", step: int | None = None,
                        use_ema: bool = False) -> str:
    """Writes the weights of the training run in `workdir` to `hf_path`; returns where they came from
    ("<workdir> step 6 (EMA)")."""
    config = load_saved_config(workdir)
    cfg = ModelConfig.from_dict(config.model)
    weights = load_weights(workdir, cfg, optimizer_cfg=config.train, step=step, use_ema=use_ema,
                           field="--workdir")
    tokenizer = tokenizers.make_tokenizer(config.data)
    token_ids = {"eos_token_id": int(tokenizer.eos_id), "pad_token_id": int(tokenizer.pad_id)}
    convert.save_checkpoint(cfg, weights.variables, hf_path, dtype=dtype, base_config=token_ids)
    if config.data.tokenizer != "byte":
        shutil.copyfile(tokenizers.tokenizer_file(config.data.tokenizer),
                        pathlib.Path(hf_path) / "tokenizer.json")
    logging.info("Wrote %s from %s.", hf_path, weights.source)
    return weights.source
