"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, arXiv 2512.02556, section 2.1).

Legend: B batch, T query time, S key time, D model, Q q latent (q_lora_rank), G indexer heads
(index_n_heads), I indexer head width (index_head_dim), R rope width (qk_rope_head_dim), k index_topk.

    q   = c_Q W_q                          [B,T,G,I]   from MLA's normalised query latent c_Q
    key = LayerNorm(x W_k)                 [B,S,I]     one key per token, shared by the heads (cached)
    w   = x W_w / sqrt(G)                  [B,T,G]     per-query weight of each head
    I[t, s] = sum_g w[t,g] ReLU(q[t,g] . key[s] / sqrt(I))                      [B,T,S]

The first R channels of q and key are rotated by position. Each query then attends (MLA, model/mla.py)
only to the k keys of highest I[t, s] among those its mask allows (causal, same document, not padding,
valid cache slot), or to all of them when it allows fewer than k.

Where the implementations differ, we follow transformers 5.23's DeepseekV32 (whose checkpoints we load):
- Rope: transformers rotates the indexer's rope channels half-split (channel j with j + R/2), MLA's
  interleaved; DeepSeek's inference code (deepseek-ai/DeepSeek-V3.2-Exp inference/model.py, commit
  6d8cb70) rotates both interleaved.
- DeepSeek's code applies a Hadamard transform to q and key and rounds both to FP8 (128-channel blocks)
  before scoring. The transform is orthogonal (q . key unchanged in exact arithmetic) and only serves the
  FP8 rounding; transformers and we score in float32 without either, and cache keys in the compute dtype.
- Ties at the k-th score: torch.topk leaves their order unspecified, `lax.top_k` takes the lower index.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.model import rope
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import Linear, compute_dtype

KEY_NORM_EPS = 1e-6  # The key's LayerNorm epsilon in DeepSeek's code and transformers (not rms_norm_eps).


class Indexer(nn.Module):
    """(x [B,T,D], c_Q [B,T,Q], cos, sin [B,T,R/2]) -> (q [B,T,G,I], w [B,T,G] float32, key [B,T,I]).

    Scoring (`index_scores`) and selection (`top_k_mask`) are separate functions, so a caller can score
    the queries against keys from a cache, or a block of queries at a time.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        G, width = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(G * width, ("q_lora", "index_heads"), dtype)
        self.wk = Linear(width, ("embed", "index_head"), dtype)
        self.k_norm = nn.LayerNorm(
            epsilon=KEY_NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("index_head",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("index_head",)))
        # Kept in float32, as DeepSeek's code and transformers keep it: the head weights scale every score.
        self.weights_proj = Linear(G, ("embed", "index_heads"), jnp.float32, high_precision=True)

    def __call__(self, x_BTD: jnp.ndarray, q_latent_BTQ: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        cfg = self.cfg
        G, R = cfg.index_n_heads, cfg.qk_rope_head_dim
        q = self.wq_b(q_latent_BTQ).reshape(*x_BTD.shape[:2], G, cfg.index_head_dim)
        q = jnp.concatenate([rope.apply_rotary_half_split(q[..., :R], cos, sin), q[..., R:]], axis=-1)
        key = self.k_norm(self.wk(x_BTD).astype(jnp.float32)).astype(q.dtype)
        key = jnp.concatenate([rope.apply_rotary_half_split(key[:, :, None, :R], cos, sin)[:, :, 0], key[..., R:]],
                              axis=-1)
        weights = self.weights_proj(x_BTD.astype(jnp.float32)) * G ** -0.5
        return q, weights, key


def index_scores(q_BTGI: jnp.ndarray, weights_BTG: jnp.ndarray, keys_BSI: jnp.ndarray) -> jnp.ndarray:
    """I[b, t, s] = sum_g w[b,t,g] ReLU(q[b,t,g] . key[b,s] / sqrt(I)), float32 [B, T, S]."""
    dots = jnp.einsum("BTGI,BSI->BTGS", q_BTGI, keys_BSI, preferred_element_type=jnp.float32)
    relu = jax.nn.relu(dots * q_BTGI.shape[-1] ** -0.5)
    return jnp.einsum("BTG,BTGS->BTS", weights_BTG.astype(jnp.float32), relu)


def top_k_keys(scores_BTS: jnp.ndarray, allowed_BTS: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each query's min(k, S) highest-scoring keys: (key indices int32 [B,T,k], valid bool [B,T,k]).

    A query allowing fewer than k keys gets all of them, padded with disallowed indices marked invalid.
    """
    masked = jnp.where(allowed_BTS, scores_BTS, -jnp.inf)
    _, keys_BTK = jax.lax.top_k(jax.lax.stop_gradient(masked), min(k, scores_BTS.shape[-1]))
    return keys_BTK, jnp.take_along_axis(allowed_BTS, keys_BTK, axis=-1)


def top_k_mask(scores_BTS: jnp.ndarray, allowed_BTS: jnp.ndarray, k: int) -> jnp.ndarray:
    """Boolean [B, T, S]: each query's k highest-scoring allowed keys (all allowed ones when fewer)."""
    B, T, S = scores_BTS.shape
    keys_BTK, valid_BTK = top_k_keys(scores_BTS, allowed_BTS, k)
    rows_B11, queries_1T1 = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
    return jnp.zeros((B, T, S), bool).at[rows_B11, queries_1T1, keys_BTK].set(valid_BTK)


def indexer_kl(attention_BTS: jnp.ndarray, scores_BTS: jnp.ndarray, keys_BTS: jnp.ndarray) -> jnp.ndarray:
    """The indexer's training loss per query (V3.2 report, eq. 3 and 4): KL(p_t || softmax(I_t)) over the keys
    `keys_BTS` marks for query t, float32 [B, T].

    p_t is the main attention summed over its heads (`attention_BTS`, [B,T,S]) and L1-normalised over those
    keys; it is the target, so no gradient reaches the main model through it. With every key the causal mask
    allows this is the dense warm-up's loss, with each query's top-k keys the sparse stage's. A query without
    keys (padding) gets 0.
    """
    target = jax.lax.stop_gradient(jnp.where(keys_BTS, attention_BTS.astype(jnp.float32), 0.0))
    p = target / jnp.maximum(target.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    # A finite floor instead of -inf keeps a query without keys NaN-free, forward and backward.
    log_q = jax.nn.log_softmax(jnp.where(keys_BTS, scores_BTS, jnp.finfo(jnp.float32).min), axis=-1)
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
