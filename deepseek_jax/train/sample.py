"""The end-of-run sample: generation without a KV cache, every new token re-running the whole sequence.

Slow (quadratic) but simple and obviously right, so it is also the reference the cached generator
(infer/) is tested against. One jit-compiled step over a fixed-size buffer: no recompilation per token.

Legend: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax import model
from deepseek_jax.data import tokenizers
from deepseek_jax.model.config import ModelConfig


@functools.partial(jax.jit, static_argnums=(0,))
def _next_logits(cfg: ModelConfig, variables, buffer_BL: jnp.ndarray, position: jnp.ndarray) -> jnp.ndarray:
    logits = model.apply(cfg, variables, buffer_BL, run_mtp=False).logits
    return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)


def generate_uncached(cfg: ModelConfig, variables, prompt_BT: jnp.ndarray, max_new_tokens: int, *,
                      temperature: float = 0.0, key: jax.Array | None = None) -> jnp.ndarray:
    """Continues each row of int32 prompt [B, T] by N tokens -> [B, T + N] (greedy at temperature 0)."""
    B, T = prompt_BT.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token.")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key.")
    buffer = jnp.zeros((B, T + max_new_tokens), jnp.int32).at[:, :T].set(prompt_BT)
    for i in range(max_new_tokens):
        logits = _next_logits(cfg, variables, buffer, jnp.int32(T + i - 1))
        if temperature > 0:
            token = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature, axis=-1)
        else:
            token = jnp.argmax(logits, axis=-1)
        buffer = buffer.at[:, T + i].set(token.astype(jnp.int32))
    return buffer


def sample_text(cfg: ModelConfig, variables: dict, data_cfg: ml_collections.ConfigDict, prompt: str,
                num_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
    """The model's continuation of `prompt` (greedy at temperature 0), decoded to text."""
    tokenizer = tokenizers.make_tokenizer(data_cfg)
    ids = np.asarray(tokenizer.encode(prompt), np.int32)[None, :]
    room = cfg.max_position_embeddings - ids.shape[1]
    out = generate_uncached(cfg, variables, jnp.asarray(ids), min(num_tokens, room), temperature=temperature,
                            key=jax.random.key(seed))
    return prompt + tokenizer.decode(np.asarray(out[0, ids.shape[1]:]))
