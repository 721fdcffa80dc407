"""Text in, text streamed out: what `python -m deepseek_jax.generate` does.

Streaming is a Python loop over the jitted decode step (`generation.stream`): after each step the
new tokens are decoded and printed. Text is released only once it is stable, so a multi-byte
character split across tokens is printed whole.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

import jax
import ml_collections
import numpy as np

from deepseek_jax.data import tokenizers
from deepseek_jax.infer import generation
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train.validation import validate_run_config
from deepseek_jax.train.weights import load_weights

REPLACEMENT = "\ufffd"  # What an incomplete UTF-8 sequence decodes to, for now.


class IncrementalText:
    """Turns a growing list of token ids into the text to print next."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(np.asarray(self.ids, np.int64), skip_special_tokens=True)

    def push(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self._decode().rstrip(REPLACEMENT)
        if not text.startswith(self.printed):  # A tokenizer rewrote earlier text: wait for the end.
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def finish(self) -> str:
        text = self._decode()
        new = text[len(self.printed):] if text.startswith(self.printed) else "\n" + text
        self.printed = text
        return new


def stream_text(cfg: ModelConfig, variables: dict, tokenizer, prompt: str, *, out: TextIO = sys.stdout,
                stop_at_eos: bool = True, **kwargs) -> generation.Generation:
    """Prints `prompt` and then its continuation as it is generated. kwargs: those of `infer.generate`."""
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if ids.size == 0:
        raise ValueError("the prompt is empty: give --prompt or a non-empty --prompt_file.")
    tokens = generation.stream(cfg, variables, ids[None, :], pad_id=tokenizer.pad_id,
                               stop_tokens=(tokenizer.eos_id,) if stop_at_eos else (), **kwargs)
    out.write(prompt)
    out.flush()
    text = IncrementalText(tokenizer)
    for new in tokens:
        out.write(text.push(new[0]))
        out.flush()
    out.write(text.finish() + "\n")
    out.flush()
    return tokens.result


def load(config: ml_collections.ConfigDict | None, *, workdir: str | None = None, hf_path: str | None = None,
         step: int | None = None, use_ema: bool = False) -> tuple[ModelConfig, dict, object, str]:
    """(model config, variables, tokenizer, description) from a training run or a Hugging Face directory."""
    if (workdir is None) == (hf_path is None):
        raise ValueError("give exactly one of --workdir (a training run) and --hf_path (a Hugging Face "
                         "checkpoint).")
    if workdir is not None:
        if config is None:
            raise ValueError("--workdir needs --config: the run configuration the checkpoint was trained with.")
        weights = load_weights(workdir, validate_run_config(config), optimizer_cfg=config.train, step=step,
                               use_ema=use_ema, field="--workdir")
        return weights.cfg, weights.variables, tokenizers.make_tokenizer(config.data), weights.source
    weights = load_weights(hf_path, None, field="--hf_path")
    tokenizer_json = os.path.join(hf_path, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        tokenizer = tokenizers.HFTokenizer(tokenizer_json)
    elif config is not None:
        tokenizer = tokenizers.make_tokenizer(config.data)
    else:
        raise ValueError(f"{hf_path} has no tokenizer.json: give --config whose data.tokenizer to use.")
    return weights.cfg, weights.variables, tokenizer, weights.source


def run(config: ml_collections.ConfigDict | None, *, prompt: str, workdir: str | None = None,
        hf_path: str | None = None, step: int | None = None, use_ema: bool = False, seed: int = 0,
        temperature: float = 0.0, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
        **kwargs) -> generation.Generation:
    """Loads the weights, streams the continuation of `prompt` to `out`, and a summary line to `err`."""
    cfg, variables, tokenizer, where = load(config, workdir=workdir, hf_path=hf_path, step=step, use_ema=use_ema)
    err.write(f"Generating with {where}.\n")
    started = time.perf_counter()
    key = jax.random.key(seed) if temperature > 0 else None
    result = stream_text(cfg, variables, tokenizer, prompt, out=out, temperature=temperature, key=key, **kwargs)
    seconds = time.perf_counter() - started
    n = int(result.num_generated[0])
    summary = f"{n} tokens in {seconds:.1f} s ({n / seconds:.1f} tokens/s, compilation included)"
    if kwargs.get("speculative"):
        summary += (f"; MTP drafts accepted {result.acceptance_rate:.1%}, "
                    f"{n / max(result.forward_passes, 1):.2f} tokens per forward pass")
    err.write(summary + ".\n")
    return result
