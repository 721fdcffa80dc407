"""The model run incrementally over a latent KV cache: `extend` (main model) and `extend_mtp` (one MTP depth).

Legend: B batch, T new tokens per row, S cache slots, D model, V vocabulary.

Both run the model's own pieces (model/transformer.py) with the cache: new tokens of row b sit at
positions lengths[b] .. lengths[b]+T-1 (positions are cache slots), each layer attends over [its cache ;
the new tokens' own latents], and the new latents are written into the cache; `lengths` is left to the
caller (prefill, decode step, speculative verify each advance it by what they keep). Attention is
`absorbed` (scores against the latent directly) or `naive` (the latent up-projected per head each step).
Passes over few tokens route them with the 'gather' MoE dispatch (parallel/dispatch.py). A decoding loop
first adds the absorbed weights to the variables (`with_absorbed_weights`), once.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from deepseek_jax.model.cache import KVCache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import compute_dtype
from deepseek_jax.model.mla import ABSORBED, split_kv_b
from deepseek_jax.model.transformer import DeepSeekV3
from deepseek_jax.parallel.dispatch import for_decoding


def with_absorbed_weights(cfg: ModelConfig, variables: dict) -> dict:
    """`variables` with the ABSORBED collection (model/mla.py): every attention's kv_b_proj kernel split per
    head into W_UK [.., H, K, C] and W_UV [.., H, C, V] in the compute dtype (`split_kv_b`; a stack's
    leading layer axis kept). Absorbed passes then read them as they are, instead of splitting and
    transposing each layer's kernel on every decoding step. Costs one more copy of the kv_b_proj kernels.
    Returns `variables` itself when it already holds the collection."""
    if ABSORBED in variables:
        return variables
    dtype = compute_dtype(cfg)

    def split(params: Mapping) -> dict:
        if "kv_b_proj" in params:  # An attention's parameters.
            w_uk, w_uv = split_kv_b(params["kv_b_proj"]["kernel"].astype(dtype), cfg.num_attention_heads,
                                    cfg.qk_nope_head_dim)
            return {"w_uk": w_uk, "w_uv": w_uv}
        found = {name: split(sub) for name, sub in params.items() if isinstance(sub, Mapping)}
        return {name: sub for name, sub in found.items() if sub}

    return {**variables, ABSORBED: split(variables["params"])}


def _model(cfg: ModelConfig, num_tokens: int, attention: str) -> DeepSeekV3:
    return DeepSeekV3(for_decoding(cfg, num_tokens), cached_attention=attention)


def extend(cfg: ModelConfig, variables: dict, cache: KVCache, tokens_BT: jnp.ndarray, *,
           attention: str = "absorbed") -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """Runs T new tokens per row through the main model at slots lengths .. lengths+T-1.

    Returns (logits [B,T,V] float32, final-normed hidden [B,T,D] (the MTP modules' h^0), the cache with
    the new entries written; `lengths` unchanged).
    """
    out = _model(cfg, tokens_BT.size, attention).apply(variables, tokens_BT, run_mtp=False, cache=cache)
    return out.logits, out.hidden, out.cache


def extend_mtp(cfg: ModelConfig, variables: dict, cache: KVCache, depth: int, h_prev_BTD: jnp.ndarray,
               tokens_ahead_BT: jnp.ndarray, *, attention: str = "absorbed"
               ) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """MTP module `depth` (0-based) at slots lengths .. lengths+T-1.

    At position i it reads h^{depth}_i (h_prev) and the token depth+1 steps ahead, t_{i+depth+1}, and
    predicts t_{i+depth+2}. Returns (logits [B,T,V], h^{depth+1} [B,T,D], cache with entries written).
    """
    model = _model(cfg, tokens_ahead_BT.size, attention)
    positions = cache.positions(tokens_ahead_BT.shape[1])
    h, logits, _, cache = model.apply(variables, depth, h_prev_BTD, tokens_ahead_BT, positions,
                                      jnp.ones_like(tokens_ahead_BT), cache, method=DeepSeekV3.mtp)
    return logits, h, cache
