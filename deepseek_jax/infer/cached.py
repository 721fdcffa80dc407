"""The model run incrementally over a latent KV cache: `extend` (main model) and `extend_mtp` (one MTP depth).

Legend: B batch, T new tokens per row, S cache slots, D model, V vocabulary, L layers, C kv latent,
R rope head dim.

`CachedBlock` and `CachedMTP` have exactly the parameter trees of model/block.Block and
model/mtp.MTPModule (same submodule names, the same MLA/MoE/MLP modules), so they apply to slices of
the trained variables. A decoder stack runs as a `lax.scan` over its leading layer axis, one
`CachedBlock.apply` per layer on that layer's params, routing biases and cache.

New tokens of row b sit at positions lengths[b] .. lengths[b]+T-1 (positions are cache slots). Each
layer attends over [its cache ; the new tokens' own latents] (`cache.past_mask`), then the new latents
are written into the cache; `lengths` is left to the caller (prefill, decode step, speculative verify
each advance it by what they keep). Attention is `absorbed` (MLA.attend_absorbed: scores against the
latent directly) or `naive` (MLA.attend: up-project the latent to per-head keys and values each step).
Passes over few tokens route them with the 'gather' MoE dispatch (`dispatch_for`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.infer.cache import MTP, KVCache, LayerCache, past_mask
from deepseek_jax.model import rope
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import MLP, Linear, RMSNorm, compute_dtype
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE
from deepseek_jax.model.transformer import DeepSeekV3

ATTENTION = ("absorbed", "naive")


class CachedBlock(nn.Module):
    """Block (pre-norm MLA + MLP/MoE) on new tokens x [B,T,D] over one layer's cache [B,S,*].

    Returns (x [B,T,D], the new tokens' cache entries LayerCache([B,T,C], [B,T,R])).
    """

    cfg: ModelConfig
    moe: bool
    attention: str = "absorbed"

    def setup(self) -> None:
        cfg = self.cfg
        self.input_layernorm = RMSNorm(cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if self.moe else MLP(cfg, cfg.intermediate_size)

    def __call__(self, x_BTD: jnp.ndarray, past: LayerCache, cos: jnp.ndarray, sin: jnp.ndarray,
                 mask_B1TK: jnp.ndarray) -> tuple[jnp.ndarray, LayerCache]:
        attn_in = self.input_layernorm(x_BTD)
        q_nope, q_rope = self.self_attn.queries(attn_in, cos, sin)
        c_kv_BTC, k_rope_BTR = self.self_attn.latent_kv(attn_in, cos, sin)
        keys_c = jnp.concatenate([past.c_kv.astype(c_kv_BTC.dtype), c_kv_BTC], axis=1)
        keys_r = jnp.concatenate([past.k_rope.astype(k_rope_BTR.dtype), k_rope_BTR], axis=1)
        attend = self.self_attn.attend_absorbed if self.attention == "absorbed" else self.self_attn.attend
        h = x_BTD + attend(q_nope, q_rope, keys_c, keys_r, mask_B1TK)
        ffn_in = self.post_attention_layernorm(h)
        if self.moe:
            y, _ = self.mlp(ffn_in, jnp.ones(ffn_in.shape[:2], bool))
        else:
            y = self.mlp(ffn_in)
        return (h + y).astype(x_BTD.dtype), LayerCache(c_kv_BTC, k_rope_BTR)


class CachedMTP(nn.Module):
    """MTPModule over a cache: (h^{k-1} [B,T,D], Emb(t_{i+k}) [B,T,D]) -> (h^k final-normed, entries)."""

    cfg: ModelConfig
    attention: str = "absorbed"

    def setup(self) -> None:
        cfg = self.cfg
        self.enorm = RMSNorm(cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.rms_norm_eps)
        self.eh_proj = Linear(cfg.hidden_size, ("mtp_concat", "embed"), compute_dtype(cfg))
        self.block = CachedBlock(cfg, cfg.mtp_uses_moe, self.attention)
        self.norm = RMSNorm(cfg.rms_norm_eps)

    def __call__(self, h_prev_BTD: jnp.ndarray, emb_ahead_BTD: jnp.ndarray, past: LayerCache,
                 cos: jnp.ndarray, sin: jnp.ndarray, mask_B1TK: jnp.ndarray) -> tuple[jnp.ndarray, LayerCache]:
        x = self.eh_proj(jnp.concatenate([self.enorm(emb_ahead_BTD), self.hnorm(h_prev_BTD)], axis=-1))
        x, new = self.block(x, past, cos, sin, mask_B1TK)
        return self.norm(x), new


def _embed(model: DeepSeekV3, tokens_BT: jnp.ndarray) -> jnp.ndarray:
    return model.embed_tokens(tokens_BT)


def _final_norm(model: DeepSeekV3, x_BTD: jnp.ndarray) -> jnp.ndarray:
    return model.norm(x_BTD)


def _head(model: DeepSeekV3, h_BTD: jnp.ndarray) -> jnp.ndarray:
    return model.head(h_BTD)


def dispatch_for(cfg: ModelConfig, num_tokens: int) -> ModelConfig:
    """The MoE dispatch for a pass over `num_tokens` tokens: 'gather' when they route to no more (token,
    expert) pairs than there are experts (decoding: reading only the chosen experts' weights beats
    touching them all), else the configured one."""
    if cfg.n_routed_experts and num_tokens * cfg.num_experts_per_tok <= cfg.n_routed_experts:
        return cfg.replace(moe_dispatch="gather")
    return cfg


def _rope_and_mask(cfg: ModelConfig, cache: KVCache, T: int):
    positions_BT = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cos, sin = rope.cos_sin(positions_BT, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    return cos, sin, past_mask(cache.lengths, cache.size, T)


def _run_stack(cfg: ModelConfig, moe: bool, attention: str, params_L, routing_L, past: LayerCache,
               x_BTD: jnp.ndarray, cos, sin, mask) -> tuple[jnp.ndarray, LayerCache]:
    block = CachedBlock(cfg, moe, attention)

    def layer(x, inputs):
        params, routing, layer_past = inputs
        return block.apply({"params": params, "routing": routing}, x, layer_past, cos, sin, mask)

    return jax.lax.scan(layer, x_BTD, (params_L, routing_L, past))


def extend(cfg: ModelConfig, variables: dict, cache: KVCache, tokens_BT: jnp.ndarray, *,
           attention: str = "absorbed") -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """Runs T new tokens per row through the main model at slots lengths .. lengths+T-1.

    Returns (logits [B,T,V] float32, final-normed hidden [B,T,D] (the MTP modules' h^0), the cache with
    the new entries written; `lengths` unchanged).
    """
    model = DeepSeekV3(cfg)
    T = tokens_BT.shape[1]
    cos, sin, mask = _rope_and_mask(cfg, cache, T)
    x = model.apply(variables, tokens_BT, method=_embed)
    layers_cfg = dispatch_for(cfg, tokens_BT.size)
    for name, moe in (("dense_layers", False), ("moe_layers", True)):
        if name not in cache.layers:
            continue
        routing = variables.get("routing", {}).get(name, {})
        x, new = _run_stack(layers_cfg, moe, attention, variables["params"][name], routing, cache.layers[name], x,
                            cos, sin, mask)
        cache = cache.write(name, new)
    h = model.apply(variables, x, method=_final_norm)
    return model.apply(variables, h, method=_head), h, cache


def extend_mtp(cfg: ModelConfig, variables: dict, cache: KVCache, depth: int, h_prev_BTD: jnp.ndarray,
               tokens_ahead_BT: jnp.ndarray, *, attention: str = "absorbed"
               ) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """MTP module `depth` (0-based) at slots lengths .. lengths+T-1.

    At position i it reads h^{depth}_i (h_prev) and the token depth+1 steps ahead, t_{i+depth+1}, and
    predicts t_{i+depth+2}. Returns (logits [B,T,V], h^{depth+1} [B,T,D], cache with entries written).
    """
    model = DeepSeekV3(cfg)
    name = f"mtp_{depth}"
    cos, sin, mask = _rope_and_mask(cfg, cache, tokens_ahead_BT.shape[1])
    past = jax.tree.map(lambda a: a[depth], cache.layers[MTP])
    emb = model.apply(variables, tokens_ahead_BT, method=_embed)
    h, new = CachedMTP(dispatch_for(cfg, tokens_ahead_BT.size), attention).apply(
        {"params": variables["params"][name], "routing": variables.get("routing", {}).get(name, {})},
        h_prev_BTD, emb, past, cos, sin, mask)
    return model.apply(variables, h, method=_head), h, cache.write(MTP, new, layer=depth)
