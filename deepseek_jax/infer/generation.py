"""The generation API: `generate` (tokens), `decode` (tokens and statistics), `stream` (step by step).

Legend: B batch, T prompt width, N max_new_tokens, D MTP draft depth, V vocabulary.

Input conventions:
- `prompt_tokens` int [B, T], right-padded: row b's prompt is its first `prompt_lengths[b]` tokens
  (default: all T). What the padding holds is ignored.
- The result is int32 [B, T + N]: each row's prompt, then its generated tokens, then `pad_id` (after
  a stop token, which is kept, and after a short prompt's end). Row b's tokens end at
  `lengths[b]` (see `Generation`).
- Greedy when temperature == 0; otherwise a `key` is required and the same key gives the same tokens.

`generate`/`decode` run the jitted prefill, then one jitted `lax.while_loop` of decode steps (it stops
early once every row is done). `stream` runs the same prefill and step functions, each jitted once,
from a Python loop, handing back each step's new tokens (what the command line prints as they come).
Programs are cached per model config, shapes, `steps.Settings` and greedy-or-not: never per token,
nor per temperature, top-k, top-p, stop tokens or key (traced values).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.checks import is_int
from deepseek_jax.infer import cached, speculative, steps
from deepseek_jax.infer.sampling import Sampling
from deepseek_jax.infer.steps import DecodeState, Settings
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.mla import CACHED_ATTENTION


class Generation(NamedTuple):
    tokens: np.ndarray  # int32 [B, T + N].
    lengths: np.ndarray  # int32 [B]: prompt + generated tokens per row (the rest is pad_id).
    num_generated: np.ndarray  # int32 [B].
    drafted: np.ndarray  # int32 [B]: MTP draft tokens proposed (speculative only).
    accepted: np.ndarray  # int32 [B]: of which accepted.
    forward_passes: int  # Main-model passes, the prefill included.

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (nan without speculation)."""
        drafted = int(self.drafted.sum())
        return int(self.accepted.sum()) / drafted if drafted else math.nan


def start(cfg: ModelConfig, s: Settings, variables: dict, prompt_BT: jnp.ndarray, lengths_B: jnp.ndarray,
          stop_tokens: jnp.ndarray, sampling: Sampling, key: jax.Array) -> DecodeState:
    """Prefill (and first drafts when speculative)."""
    state, h0 = steps.prefill(cfg, variables, prompt_BT, lengths_B, stop_tokens, sampling, key, s)
    if s.speculative:
        state = speculative.first_drafts(cfg, variables, state, h0, prompt_BT, s)
    return state


def step(cfg: ModelConfig, s: Settings, variables: dict, state: DecodeState) -> DecodeState:
    """One decode step: a token per row, or a speculative verify-and-draft."""
    fn = speculative.speculative_step if s.speculative else steps.decode_step
    return fn(cfg, variables, state, s)


def loop_variables(cfg: ModelConfig, s: Settings, variables: dict) -> dict:
    """What the decode steps read: the variables, with the absorbed weights split once for all steps."""
    return cached.with_absorbed_weights(cfg, variables) if s.attention == "absorbed" else variables


def finish(cfg: ModelConfig, s: Settings, variables: dict, state: DecodeState) -> DecodeState:
    """Decode steps until every row is done (a lax.while_loop)."""
    variables = loop_variables(cfg, s, variables)
    return jax.lax.while_loop(lambda st: ~jnp.all(st.done), functools.partial(step, cfg, s, variables), state)


# Three programs. The prefill and the loop are compiled apart: compiled as one program, the loop's
# steps ran 2-3x slower (measured on CPU with configs/tiny.py).
start_jit = jax.jit(start, static_argnums=(0, 1))
step_jit = jax.jit(step, static_argnums=(0, 1), donate_argnums=(3,))  # The cache is updated in place.
finish_jit = jax.jit(finish, static_argnums=(0, 1), donate_argnums=(3,))
loop_variables_jit = jax.jit(loop_variables, static_argnums=(0, 1))  # For `stream`'s step by step loop.


def run(cfg: ModelConfig, s: Settings, variables: dict, prompt_BT: jnp.ndarray, lengths_B: jnp.ndarray,
        stop_tokens: jnp.ndarray, sampling: Sampling, key: jax.Array) -> DecodeState:
    """Prefill, then decode steps until every row is done."""
    state = start_jit(cfg, s, variables, prompt_BT, lengths_B, stop_tokens, sampling, key)
    return finish_jit(cfg, s, variables, state)


def _result(state: DecodeState) -> Generation:
    host = jax.device_get(state)
    return Generation(tokens=np.asarray(host.tokens), lengths=np.asarray(host.prompt_lengths + host.num_generated),
                      num_generated=np.asarray(host.num_generated), drafted=np.asarray(host.drafted),
                      accepted=np.asarray(host.accepted), forward_passes=int(host.step))


def prepare(cfg: ModelConfig, prompt_tokens, *, max_new_tokens: int, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None, speculative: bool = False,
            key: jax.Array | None = None, prompt_lengths=None, stop_tokens: Sequence[int] = (), pad_id: int = 0,
            attention: str = "absorbed", cache_size: int | None = None):
    """Checks every argument (ValueError naming the problem).

    Returns (settings, prompt, lengths, stop tokens, sampling, key): the arguments of `start`/`run`.
    """
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim != 2 or not (np.issubdtype(prompt.dtype, np.integer) or prompt.size == 0):
        raise ValueError(f"prompt_tokens must be integer ids of shape [batch, length], got {prompt.dtype} "
                         f"{prompt.shape}.")
    B, T = prompt.shape
    if B == 0 or T == 0:
        raise ValueError(f"the prompt is empty (shape {prompt.shape}): give at least one token per row.")
    lengths = np.full((B,), T, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"prompt_lengths must be {B} integers (one per row), got {lengths.dtype} "
                         f"{lengths.shape}.")
    if np.any(lengths < 1):
        raise ValueError(f"row {int(np.argmax(lengths < 1))} has an empty prompt (prompt_lengths "
                         f"{lengths.tolist()}): give at least one token per row.")
    if np.any(lengths > T):
        raise ValueError(f"prompt_lengths {lengths.tolist()} exceed the prompt width {T}.")
    inside = np.arange(T)[None, :] < lengths[:, None]
    bad = inside & ((prompt < 0) | (prompt >= cfg.vocab_size))
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise ValueError(f"prompt token {int(prompt[b, t])} at row {b}, position {t} is not a token id: "
                         f"ids must be in [0, vocab_size={cfg.vocab_size}).")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    longest = int(lengths.max()) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"a prompt of {int(lengths.max())} tokens plus {max_new_tokens} new ones reaches "
                         f"position {longest}, past the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}: shorten the prompt or generate fewer tokens.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if top_k is not None and not (is_int(top_k) and 1 <= top_k <= cfg.vocab_size):
        raise ValueError(f"top_k must be None or an integer in [1, {cfg.vocab_size}], got {top_k!r}.")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}.")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key (key=jax.random.key(seed)).")
    if speculative and cfg.num_nextn_predict_layers == 0:
        raise ValueError("speculative=True drafts with the MTP modules, but this model has none "
                         "(num_nextn_predict_layers=0): use speculative=False.")
    if attention not in CACHED_ATTENTION:
        raise ValueError(f"attention must be one of {CACHED_ATTENTION}, got {attention!r}.")
    stops = [int(t) for t in stop_tokens]
    if any(not 0 <= t < cfg.vocab_size for t in stops):
        raise ValueError(f"stop_tokens {stops} must be ids in [0, {cfg.vocab_size}).")
    if not is_int(pad_id):
        raise ValueError(f"pad_id must be an integer, got {pad_id!r}.")
    draft_slots = cfg.num_nextn_predict_layers if speculative else 0
    needed = T + max(max_new_tokens - 1, 0) + draft_slots
    if cache_size is None:
        cache_size = needed
    elif not is_int(cache_size) or cache_size < needed:
        what = (f"the prompt of {T} tokens is longer than the cache ({cache_size} slots)" if is_int(cache_size)
                and T > cache_size else f"a cache of {cache_size!r} slots cannot hold a {T}-token prompt plus "
                f"{max_new_tokens} new tokens" + (f" and {draft_slots} draft slots" if draft_slots else ""))
        raise ValueError(f"{what}: use cache_size >= {needed} (or None).")
    settings = Settings(max_new_tokens=int(max_new_tokens), cache_size=int(cache_size),
                        speculative=bool(speculative), attention=attention, pad_id=int(pad_id))
    choice = Sampling.make(float(temperature), top_k, top_p, cfg.vocab_size)
    stop_array = jnp.asarray(stops or [-1], jnp.int32)
    key = jax.random.key(0) if key is None else key  # Unused when greedy.
    prompt = jnp.asarray(np.where(inside, prompt, 0), jnp.int32)
    return settings, prompt, jnp.asarray(lengths, jnp.int32), stop_array, choice, key


def decode(model_config: ModelConfig, params: dict, prompt_tokens, *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           speculative: bool = False, key: jax.Array | None = None, prompt_lengths=None,
           stop_tokens: Sequence[int] = (), pad_id: int = 0, attention: str = "absorbed",
           cache_size: int | None = None) -> Generation:
    """`generate`, returning the tokens with per-row lengths and the speculative statistics."""
    settings, *arrays = prepare(
        model_config, prompt_tokens, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, speculative=speculative, key=key, prompt_lengths=prompt_lengths, stop_tokens=stop_tokens,
        pad_id=pad_id, attention=attention, cache_size=cache_size)
    return _result(run(model_config, settings, params, *arrays))


def generate(model_config: ModelConfig, params: dict, prompt_tokens, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             speculative: bool = False, key: jax.Array | None = None, prompt_lengths=None,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, attention: str = "absorbed",
             cache_size: int | None = None) -> np.ndarray:
    """Continues each prompt row by up to `max_new_tokens` tokens; returns int32 [B, T + max_new_tokens].

    Args:
      model_config: the model's ModelConfig.
      params: the variables {'params', 'routing'} (as from deepseek_jax.model.init or a checkpoint).
      prompt_tokens: int [B, T], right-padded when `prompt_lengths` is given.
      max_new_tokens: N >= 0.
      temperature: 0 = greedy; > 0 samples (needs `key`), after top_k then top_p filtering.
      speculative: draft with the MTP modules and verify with the main model (same output as plain
        decoding when greedy; the same distribution when sampling).
      prompt_lengths: int [B], each in [1, T]; None = every row is T tokens long.
      stop_tokens: ids that end a row (kept in the output; pad_id follows).
      pad_id: the id written after each row's end.
      attention: 'absorbed' (default) or 'naive' MLA over the latent cache.
      cache_size: slots per row (default: exactly what the prompt and N tokens need).

    Raises:
      ValueError: empty prompt, ids outside [0, vocab_size), prompt longer than the cache or past
        max_position_embeddings, bad sampling arguments, speculation without MTP modules.
    """
    return decode(model_config, params, prompt_tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, speculative=speculative, key=key, prompt_lengths=prompt_lengths,
                  stop_tokens=stop_tokens, pad_id=pad_id, attention=attention, cache_size=cache_size).tokens


class TokenStream:
    """Iterating yields, after the prefill and after each decode step, the tokens each row gained
    (a list of B int arrays, possibly empty). `result` holds the `Generation` once the rows are done.

    Takes the keyword arguments of `generate`.
    """

    def __init__(self, model_config: ModelConfig, params: dict, prompt_tokens, **kwargs):
        self._cfg, self._params = model_config, params
        self._settings, *self._arrays = prepare(model_config, prompt_tokens, **kwargs)
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        cfg, s = self._cfg, self._settings
        state = start_jit(cfg, s, self._params, *self._arrays)
        variables = loop_variables_jit(cfg, s, self._params)
        lengths = np.asarray(state.prompt_lengths)
        emitted = np.zeros_like(lengths)
        while True:
            tokens, counts, done = jax.device_get((state.tokens, state.num_generated, state.done))
            yield [tokens[b, lengths[b] + emitted[b]:lengths[b] + counts[b]] for b in range(len(lengths))]
            emitted = counts
            if done.all():
                break
            state = step_jit(cfg, s, variables, state)
        self.result = _result(state)


def stream(model_config: ModelConfig, params: dict, prompt_tokens, **kwargs) -> TokenStream:
    """`generate`, step by step: see TokenStream."""
    return TokenStream(model_config, params, prompt_tokens, **kwargs)
