"""MTP self-speculative decoding (DeepSeek-V3 section 5.4.3): the MTP modules draft, the main model verifies.

Legend: B batch, D draft depth (= num_nextn_predict_layers), J positions of one pass, V vocabulary.

The state holds n = cache.lengths cached tokens, the newest token t_n (not cached) and drafts
d_1..d_D for t_{n+1}..t_{n+D}. One step:
  1. verify: the main model runs [t_n, d_1..d_D] at positions n..n+D in one pass (writing their
     latents) and accepts the longest prefix of drafts it agrees with, a in [0, D]; it emits a + 1
     tokens (the accepted drafts and its own next token). Greedy: accept d_j iff it is the argmax.
     Sampling: accept d_j with probability min(1, p/q), else draw from max(p - q, 0) (Leviathan et al.,
     2023), so the output has exactly the main model's distribution.
  2. draft: MTP depth k (1-based) at position i reads h^{k-1}_i and t_{i+k}; it runs over the same
     positions n..n+D, which both writes its cache for the newly kept positions and, read at
     position n+a, yields the next drafts. Inputs past n+a are garbage and never kept.
  3. rollback: lengths = n + a + 1 for every cache. Entries written for rejected positions lie beyond
     the valid length: masked, then overwritten by the next step's writes.
The prefill is the same draft pass over the prompt (positions 0..L-1, a = L-1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.infer import cached
from deepseek_jax.infer.sampling import Sampling, probabilities, sample, sample_probs
from deepseek_jax.infer.steps import DecodeState, Settings, advance, choice_key, emit, last_valid
from deepseek_jax.model.cache import KVCache
from deepseek_jax.model.config import ModelConfig


def draft(cfg: ModelConfig, variables: dict, cache: KVCache, h0_BJD: jnp.ndarray, known_BJ: jnp.ndarray,
          accepted_B: jnp.ndarray, sampling: Sampling, key: jax.Array, step, s: Settings
          ) -> tuple[jnp.ndarray, jnp.ndarray | None, KVCache]:
    """Runs every MTP depth over J positions from slot lengths; returns (drafts [B,D], their probs, cache).

    known_BJ[b, j] is the true token after position lengths+j, for j <= accepted_B[b] (later entries
    are ignored); h0_BJD the main model's final hidden states there. Drafts are read at j = accepted.
    """
    B, J = known_BJ.shape
    D = cfg.num_nextn_predict_layers
    a_B1 = accepted_B[:, None]
    j_BJ = jnp.broadcast_to(jnp.arange(J, dtype=jnp.int32)[None, :], (B, J))
    drafts = jnp.zeros((B, D), jnp.int32)
    probs, h = [], h0_BJD
    for k in range(D):
        # Depth k+1 at position n+j (n = lengths) reads t_{n+j+k+1}: known[j+k] while j+k <= a, else
        # the draft d_{j+k-a} a shallower depth just made (only j <= a is kept).
        m = j_BJ + k
        from_known = jnp.take_along_axis(known_BJ, jnp.minimum(m, J - 1), axis=1)
        from_drafts = jnp.take_along_axis(drafts, jnp.clip(m - a_B1 - 1, 0, D - 1), axis=1)
        ahead = jnp.where(m <= a_B1, from_known, from_drafts)
        logits, h, cache = cached.extend_mtp(cfg, variables, cache, k, h, ahead, attention=s.attention)
        logits_at_a = last_valid(logits, accepted_B + 1)
        drafts = drafts.at[:, k].set(sample(choice_key(key, step, 1 + k), logits_at_a, sampling))
        if not sampling.greedy:
            probs.append(probabilities(logits_at_a, sampling))
    return drafts, (jnp.stack(probs, axis=1) if probs else None), cache


def verify(key: jax.Array, logits_BJV: jnp.ndarray, drafts_BD: jnp.ndarray, draft_probs_BDV: jnp.ndarray | None,
           sampling: Sampling) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Main-model logits at [t_n, d_1..d_D] -> (accepted drafts a [B], emitted tokens [B, D+1]).

    emitted[:, :a] are the accepted drafts and emitted[:, a] the main model's own token; later
    entries are meaningless.
    """
    B, J, V = logits_BJV.shape
    D = J - 1
    j_BJ = jnp.broadcast_to(jnp.arange(J, dtype=jnp.int32)[None, :], (B, J))
    if sampling.greedy:
        target = jnp.argmax(logits_BJV, axis=-1).astype(jnp.int32)
        accept = drafts_BD == target[:, :D]
    else:
        p = probabilities(logits_BJV.reshape(B * J, V), sampling).reshape(B, J, V)
        q = draft_probs_BDV
        p_d = jnp.take_along_axis(p[:, :D], drafts_BD[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q, drafts_BD[..., None], axis=-1)[..., 0]
        key_u, key_x = jax.random.split(key)
        accept = jax.random.uniform(key_u, (B, D)) * q_d < p_d  # u < p/q, with q > 0 at a drawn draft.
    a = jnp.sum(jnp.cumprod(accept, axis=1), axis=1, dtype=jnp.int32)
    if sampling.greedy:
        return a, target  # Accepted drafts equal the argmax, so the argmax row is the emission.
    p_a = last_valid(p, a + 1)
    q_a = last_valid(jnp.concatenate([q, jnp.zeros((B, 1, V), q.dtype)], axis=1), a + 1)  # 0 when a == D.
    residual = jnp.maximum(p_a - q_a, 0.0)
    residual = jnp.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p_a)  # Rounding guard.
    own = sample_probs(key_x, residual)
    drafts_BJ = jnp.concatenate([drafts_BD, jnp.zeros((B, 1), jnp.int32)], axis=1)
    return a, jnp.where(j_BJ < a[:, None], drafts_BJ, own[:, None])


def first_drafts(cfg: ModelConfig, variables: dict, state: DecodeState, h0_BTD: jnp.ndarray,
                 prompt_BT: jnp.ndarray, s: Settings) -> DecodeState:
    """After the prefill: run the MTP modules over the prompt (filling their caches) and draft."""
    B, T = prompt_BT.shape
    known = jnp.concatenate([prompt_BT[:, 1:], jnp.zeros((B, 1), jnp.int32)], axis=1)  # t_{i+1}
    known = known.at[jnp.arange(B), state.prompt_lengths - 1].set(state.last_token)
    known = jnp.where(jnp.arange(T)[None, :] < state.prompt_lengths[:, None], known, 0)
    cache = state.cache.replace(lengths=jnp.zeros_like(state.cache.lengths))  # Write from slot 0.
    drafts, probs, cache = draft(cfg, variables, cache, h0_BTD, known, state.prompt_lengths - 1, state.sampling,
                                 state.key, 0, s)
    return state.replace(cache=cache.replace(lengths=state.cache.lengths), drafts=drafts, draft_probs=probs)


def speculative_step(cfg: ModelConfig, variables: dict, state: DecodeState, s: Settings) -> DecodeState:
    """Verify the drafts, keep a + 1 tokens per row, roll the caches back past the rest, draft again."""
    D = cfg.num_nextn_predict_layers
    inputs = jnp.concatenate([state.last_token[:, None], state.drafts], axis=1)
    logits, h0, cache = cached.extend(cfg, variables, state.cache, inputs, attention=s.attention)
    a, emitted = verify(choice_key(state.key, state.step), logits, state.drafts, state.draft_probs,
                        state.sampling)
    drafts, probs, cache = draft(cfg, variables, cache, h0, emitted, a, state.sampling, state.key, state.step, s)
    new = emit(state, emitted, a + 1, s.max_new_tokens)
    active = ~state.done
    return new.replace(
        cache=advance(new, cache, a + 1), last_token=last_valid(emitted, a + 1), drafts=drafts,
        draft_probs=probs, step=state.step + 1, drafted=state.drafted + jnp.where(active, D, 0),
        accepted=state.accepted + jnp.where(active, a, 0))
