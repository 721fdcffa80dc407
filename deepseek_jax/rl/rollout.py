"""Rollouts: G completions per prompt from the policy, with the jitted generator (deepseek_jax.infer).

Legend: P prompts, G group size, N = P x G completions, S prompt width (`max_prompt_tokens`),
M max new tokens, W = S + M sequence width.

Every batch has the same shapes (prompts right-padded to S, sequences to W), so the generator and the
scoring and update programs compile once per run. Row n of a batch is prompt n // G's n % G-th
completion: a group is G consecutive rows. A completion ends at its stop token (end of document, kept:
emitting it is an action of the policy) or after M tokens (then it is `truncated`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from deepseek_jax import infer
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.rl.tasks import Example


@dataclasses.dataclass
class Rollouts:
    examples: list[Example]  # N: each prompt's example, repeated G times.
    completions: list[str]  # N decoded completions (no stop token).
    tokens: np.ndarray  # int32 [N, W]: prompt, completion, then pad.
    prompt_lengths: np.ndarray  # int32 [N].
    lengths: np.ndarray  # int32 [N]: prompt + completion tokens.
    truncated: np.ndarray  # bool [N]: no stop token within M tokens.

    @property
    def completion_lengths(self) -> np.ndarray:
        return self.lengths - self.prompt_lengths


def encode_prompts(tokenizer, examples: Sequence[Example], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [P, S] right-padded with the pad id, lengths int32 [P]); a prompt longer than S is an
    error naming config.rl.max_prompt_tokens."""
    ids = np.full((len(examples), width), tokenizer.pad_id, np.int32)
    lengths = np.zeros((len(examples),), np.int32)
    for i, example in enumerate(examples):
        encoded = tokenizer.encode(example.prompt)
        if not 1 <= len(encoded) <= width:
            raise ValueError(f"prompt {example.prompt!r} is {len(encoded)} tokens: config.rl.max_prompt_tokens="
                             f"{width} must be at least that (and prompts must not be empty).")
        ids[i, :len(encoded)] = encoded
        lengths[i] = len(encoded)
    return ids, lengths


def sample(cfg: ModelConfig, variables: dict, tokenizer, examples: Sequence[Example], *, group_size: int,
           max_prompt_tokens: int, max_new_tokens: int, temperature: float, key: jax.Array | None,
           top_k: int | None = None, top_p: float | None = None) -> Rollouts:
    """G completions of each of the P prompts (greedy at temperature 0, then G should be 1)."""
    prompt_ids, prompt_lengths = encode_prompts(tokenizer, examples, max_prompt_tokens)
    prompt_ids = np.repeat(prompt_ids, group_size, axis=0)
    prompt_lengths = np.repeat(prompt_lengths, group_size)
    out = infer.decode(cfg, variables, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, key=key, prompt_lengths=prompt_lengths,
                       stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    N = out.tokens.shape[0]  # out.tokens is [N, S + M]: prompt, generated tokens, pad.
    completions, truncated = [], np.zeros((N,), bool)
    for n in range(N):
        generated = out.tokens[n, prompt_lengths[n]:out.lengths[n]]
        stopped = generated.size > 0 and generated[-1] == tokenizer.eos_id
        truncated[n] = not stopped
        completions.append(tokenizer.decode(generated[:-1] if stopped else generated, skip_special_tokens=True))
    return Rollouts(examples=[e for e in examples for _ in range(group_size)], completions=completions,
                    tokens=out.tokens.astype(np.int32), prompt_lengths=prompt_lengths.astype(np.int32),
                    lengths=out.lengths.astype(np.int32), truncated=truncated)


def scoring_arrays(r: Rollouts) -> dict[str, np.ndarray]:
    """The model inputs and the completion mask of a batch.

    tokens, segment_ids int32 [N, W] (segment 1 on the sequence, 0 on padding); mask float32 [N, W-1]
    aligned with the log-probs of tokens[:, 1:] (see scoring.token_logprobs): 1 on completion tokens.
    """
    N, W = r.tokens.shape
    position = np.arange(W)[None, :]
    segment_ids = (position < r.lengths[:, None]).astype(np.int32)
    target = position[:, 1:]
    mask = (target >= r.prompt_lengths[:, None]) & (target < r.lengths[:, None])
    return {"tokens": r.tokens, "segment_ids": segment_ids, "mask": mask.astype(np.float32)}
