"""Plain incremental decoding: the decode state, the prefill, one token per step, and emitting tokens.

Legend: B batch, T prompt width, N max new tokens, W = T + N output width, D draft depth (MTP modules
used; 0 without speculation), V vocabulary.

Prompts are right-padded: row b's prompt is prompt[b, :lengths[b]] and its positions are 0..lengths[b]-1,
exactly as if it were alone (the padding is never attended to and is overwritten in the cache). Output
row b is its prompt, then its generated tokens, then `pad_id` (also after a stop token, which is kept).

Everything here is a pure function of arrays; `generation.py` jits it (one program for the prefill, and
one for a step or for the whole `lax.while_loop` of steps), so decoding never recompiles per token.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from deepseek_jax.infer import cached
from deepseek_jax.infer.sampling import Sampling, sample
from deepseek_jax.model.cache import KVCache, init_cache
from deepseek_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static choices of one generation program (hashable: part of the jit cache key)."""

    max_new_tokens: int  # N.
    cache_size: int  # S, slots per row.
    speculative: bool = False  # Draft with the MTP modules, verify with the main model.
    attention: str = "absorbed"  # 'absorbed' or 'naive' (see cached.py).
    pad_id: int = 0  # Fills each row after its prompt and generated tokens.


@flax.struct.dataclass
class DecodeState:
    cache: KVCache  # lengths = tokens whose latents are cached (prompt + generated - 1).
    tokens: jnp.ndarray  # int32 [B, W]: prompt, generated tokens, pad_id.
    prompt_lengths: jnp.ndarray  # int32 [B].
    num_generated: jnp.ndarray  # int32 [B]: tokens emitted so far (the stop token included).
    done: jnp.ndarray  # bool [B]: N tokens emitted or a stop token seen.
    last_token: jnp.ndarray  # int32 [B]: the newest token, not yet in the cache.
    drafts: jnp.ndarray  # int32 [B, D]: MTP guesses of the D tokens after last_token.
    draft_probs: jnp.ndarray | None  # float32 [B, D, V] they were drawn from (speculative sampling only).
    stop_tokens: jnp.ndarray  # int32 [n]: ids that end a row (-1 = none).
    sampling: Sampling  # How tokens are chosen (greedy is static, the rest traced).
    key: jax.Array  # Base key of every random choice (see choice_key).
    step: jnp.ndarray  # int32: main-model forward passes so far (the prefill is pass 0 -> step 1).
    drafted: jnp.ndarray  # int32 [B]: draft tokens proposed while the row was active.
    accepted: jnp.ndarray  # int32 [B]: of which the main model accepted.


def emit(state: DecodeState, new_BJ: jnp.ndarray, count_B: jnp.ndarray, max_new_tokens: int) -> DecodeState:
    """Appends new_BJ[b, :count_B[b]] to each active row, cut at N tokens and after a stop token."""
    B, J = new_BJ.shape
    j_J = jnp.arange(J, dtype=jnp.int32)[None, :]
    room_B1 = (max_new_tokens - state.num_generated)[:, None]
    valid = (j_J < count_B[:, None]) & (j_J < room_B1) & ~state.done[:, None]
    is_stop = valid & jnp.any(new_BJ[:, :, None] == state.stop_tokens[None, None, :], axis=-1)
    after_stop = (jnp.cumsum(is_stop, axis=1) - is_stop) > 0
    valid = valid & ~after_stop
    slots = state.prompt_lengths[:, None] + state.num_generated[:, None] + j_J
    slots = jnp.where(valid, slots, state.tokens.shape[1])  # Out of range: dropped.
    tokens = state.tokens.at[jnp.arange(B)[:, None], slots].set(new_BJ, mode="drop")
    num_generated = state.num_generated + valid.sum(axis=1, dtype=jnp.int32)
    done = state.done | jnp.any(is_stop, axis=1) | (num_generated >= max_new_tokens)
    return state.replace(tokens=tokens, num_generated=num_generated, done=done)


def choice_key(key: jax.Array, step, use: int = 0) -> jax.Array:
    """The key of one random choice: step `step` (0 = the prefill), use 0 = the main model's tokens,
    use 1 + k = MTP depth k's draft."""
    return jax.random.fold_in(jax.random.fold_in(key, step), use)


def last_valid(x_BT: jnp.ndarray, lengths_B: jnp.ndarray) -> jnp.ndarray:
    """x[b, lengths[b] - 1] for x [B, T, ...]."""
    index = (lengths_B - 1).reshape((-1,) + (1,) * (x_BT.ndim - 1))
    return jnp.take_along_axis(x_BT, index, axis=1)[:, 0]


def prefill(cfg: ModelConfig, variables: dict, prompt_BT: jnp.ndarray, lengths_B: jnp.ndarray,
            stop_tokens: jnp.ndarray, sampling: Sampling, key: jax.Array, s: Settings
            ) -> tuple[DecodeState, jnp.ndarray]:
    """Caches the prompts, picks each row's first new token. Returns (state, main hidden h^0 [B,T,D])."""
    B, T = prompt_BT.shape
    valid_BT = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths_B[:, None]
    cache = init_cache(cfg, B, s.cache_size, mtp=s.speculative)
    logits, h0, cache = cached.extend(cfg, variables, cache, jnp.where(valid_BT, prompt_BT, 0),
                                      attention=s.attention)
    first = sample(choice_key(key, 0), last_valid(logits, lengths_B), sampling)
    tokens = jnp.full((B, T + s.max_new_tokens), s.pad_id, jnp.int32)
    tokens = tokens.at[:, :T].set(jnp.where(valid_BT, prompt_BT, s.pad_id))
    zeros = lambda: jnp.zeros((B,), jnp.int32)  # noqa: E731  (distinct buffers: steps donate the state)
    state = DecodeState(
        cache=cache.replace(lengths=lengths_B), tokens=tokens, prompt_lengths=lengths_B, num_generated=zeros(),
        done=jnp.zeros((B,), bool), last_token=first, drafts=jnp.zeros((B, 0), jnp.int32), draft_probs=None,
        stop_tokens=stop_tokens, sampling=sampling, key=key, step=jnp.ones((), jnp.int32), drafted=zeros(),
        accepted=zeros())
    return emit(state, first[:, None], jnp.ones((B,), jnp.int32), s.max_new_tokens), h0


def advance(state: DecodeState, cache: KVCache, kept_B: jnp.ndarray) -> KVCache:
    """The cache after a step that wrote entries for `kept_B` valid tokens per row.

    Rows still active keep them (lengths += kept); finished rows are left as they were, so their
    later (ignored) writes stay inside the slots they already used.
    """
    return cache.replace(lengths=jnp.where(state.done, cache.lengths, cache.lengths + kept_B))


def decode_step(cfg: ModelConfig, variables: dict, state: DecodeState, s: Settings) -> DecodeState:
    """One token per row: cache last_token, pick the next one."""
    logits, _, cache = cached.extend(cfg, variables, state.cache, state.last_token[:, None],
                                     attention=s.attention)
    token = sample(choice_key(state.key, state.step), logits[:, 0], state.sampling)
    one = jnp.ones_like(token)
    new = emit(state, token[:, None], one, s.max_new_tokens)
    return new.replace(cache=advance(new, cache, one), last_token=token, step=state.step + 1)
