"""Continue a prompt with a trained model, printing the tokens as they are generated.

    python -m deepseek_jax.generate --config=configs/tiny.py --workdir=runs/tiny [--use_ema] \
        --prompt="def f(" [--prompt_file=...] --max_new_tokens=200 [--temperature=0.8 --top_k=40 --top_p=0.95] \
        [--speculative]
    python -m deepseek_jax.generate --hf_path=/ckpt/DeepSeek-V3 --prompt=...   # a Hugging Face checkpoint

Greedy unless --temperature > 0. Stops at the tokenizer's end-of-document token (--nostop_at_eos to go
on). A summary (tokens/s, MTP acceptance with --speculative) goes to stderr.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.infer import text

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run whose checkpoint to load.")
_HF_PATH = flags.DEFINE_string("hf_path", None, "A Hugging Face checkpoint directory (instead of --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "Generate with the EMA of the params.")
_PROMPT = flags.DEFINE_string("prompt", None, "The text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file whose whole content is the prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = no limit).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = no limit).")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "MTP self-speculative decoding.")
_ATTENTION = flags.DEFINE_enum("attention", "absorbed", ["absorbed", "naive"], "MLA attention over the cache.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop at the end-of-document token.")


def main(argv: list[str]) -> None:
    del argv
    print(f"JAX devices: {jax.devices()}", file=sys.stderr)  # stdout carries the generated text only.
    logging.set_verbosity(logging.WARNING)
    if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
        raise app.UsageError("give exactly one of --prompt and --prompt_file.")
    if _PROMPT_FILE.value is not None:
        with open(_PROMPT_FILE.value, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = _PROMPT.value
    text.run(_CONFIG.value, prompt=prompt, workdir=_WORKDIR.value, hf_path=_HF_PATH.value, step=_STEP.value,
             use_ema=_USE_EMA.value, seed=_SEED.value, max_new_tokens=_MAX_NEW.value,
             temperature=_TEMPERATURE.value, top_k=_TOP_K.value or None,
             top_p=None if _TOP_P.value >= 1.0 else _TOP_P.value, speculative=_SPECULATIVE.value,
             attention=_ATTENTION.value, stop_at_eos=_STOP_AT_EOS.value)


if __name__ == "__main__":
    cli.run(main)
