"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus), explicit keys.

Legend: B batch, V vocabulary.

The filters apply in Hugging Face's order: logits / temperature, then keep the `top_k` most likely
tokens, then keep the smallest set of most likely tokens whose probability sums to at least `top_p`.
Ties rank the lower id first. Temperature 0 means greedy (argmax, lowest id on ties).

`Sampling` is a pytree: whether it is greedy is static (part of the compiled program), temperature,
top_k and top_p are traced values, so changing them never recompiles.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Sampling:
    temperature: jnp.ndarray  # float32 scalar, > 0 when sampling.
    top_k: jnp.ndarray  # int32 scalar: keep this many tokens (V = no filter).
    top_p: jnp.ndarray  # float32 scalar: nucleus mass (1 = no filter).
    greedy: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             vocab_size: int = 2 ** 31 - 1) -> Sampling:
        """From Python values: temperature 0 = greedy; None = no top-k / top-p filter."""
        return cls(jnp.float32(temperature if temperature > 0 else 1.0),
                   jnp.int32(vocab_size if top_k is None else min(top_k, vocab_size)),
                   jnp.float32(1.0 if top_p is None else top_p), greedy=temperature == 0)


def filtered_logits(logits_BV: jnp.ndarray, s: Sampling) -> jnp.ndarray:
    """float32 logits / temperature with the filtered-out tokens at -inf."""
    logits = logits_BV.astype(jnp.float32) / s.temperature
    B, V = logits.shape
    order_BV = jnp.argsort(-logits, axis=-1, stable=True)  # Most likely first, lower id on ties.
    rank_BV = jnp.arange(V, dtype=jnp.int32)[None, :]
    keep_sorted = rank_BV < s.top_k
    sorted_probs = jax.nn.softmax(jnp.where(keep_sorted, jnp.take_along_axis(logits, order_BV, axis=-1),
                                            -jnp.inf), axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # Mass of the more likely tokens.
    keep_sorted = keep_sorted & ((before < s.top_p) | (s.top_p >= 1.0))  # The first token always stays.
    keep = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], order_BV].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def probabilities(logits_BV: jnp.ndarray, s: Sampling) -> jnp.ndarray:
    """The distribution tokens are drawn from, float32 [B, V] (one-hot of the argmax when greedy)."""
    if s.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logits_BV, s), axis=-1)


def sample(key: jax.Array, logits_BV: jnp.ndarray, s: Sampling) -> jnp.ndarray:
    """Next token ids, int32 [B]."""
    if s.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_BV, s), axis=-1).astype(jnp.int32)


def sample_probs(key: jax.Array, probs_BV: jnp.ndarray) -> jnp.ndarray:
    """Draws from explicit (possibly unnormalised, non-negative) probabilities [B, V] -> int32 [B]."""
    return jax.random.categorical(key, jnp.log(probs_BV), axis=-1).astype(jnp.int32)
