"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Legend: B batch, T query time, S key time, D model, H heads, K nope head dim (qk_nope_head_dim),
R rope head dim (qk_rope_head_dim), V value head dim, C kv latent (kv_lora_rank), Q q latent (q_lora_rank).

    c_Q  = RMSNorm(x W_DQ)                       [B,T,Q]      (or no latent when q_lora_rank is None)
    q    = c_Q W_UQ  -> (q_nope [B,T,H,K], q_rope [B,T,H,R]);  q_rope = RoPE(q_rope)
    c_KV, k_rope = x W_DKV                        [B,T,C], [B,T,R];  k_rope = RoPE(k_rope), one per token
    k_nope, v = RMSNorm(c_KV) W_UKV              [B,T,H,K], [B,T,H,V]
    o    = softmax((q_nope.k_nope + q_rope.k_rope) * scale + mask) v  W_O

With DeepSeek Sparse Attention (V3.2, cfg.sparse_attention) a lightning indexer (model/indexer.py) scores
every allowed key per query, and each query attends, in the absorbed form below, to the latents of its
index_topk best keys only, gathered (`attend_gathered`).

A KV cache needs only RMSNorm(c_KV) and the rotated k_rope per token (model/cache.py), and the indexer's key
under sparse attention. Given one, the new tokens attend over [cache ; themselves], `absorbed` (scores
against the latent directly, DeepSeek's inference form) or `naive` (the latent up-projected to per-head keys
and values), and their own entries come back for the caller to write. Parameter names are those of the
Hugging Face checkpoints, kernels stored [in, out].
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.model import remat, rope
from deepseek_jax.model.cache import LayerCache, past_mask
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.indexer import Indexer, index_scores, indexer_kl, top_k_keys, top_k_mask
from deepseek_jax.model.layers import Linear, RMSNorm, compute_dtype
from deepseek_jax.ops.recipe import Recipe

NEG_INF = float(jnp.finfo(jnp.float32).min)
IndexerOutputs = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]  # Indexer's (q [B,T,G,I], weights [B,T,G], key [B,T,I]).
# The latent norms use a fixed epsilon whatever `rms_norm_eps` says, as DeepSeek's inference code and
# transformers do (only the layer norms read the config).
LATENT_NORM_EPS = 1e-6
CACHED_ATTENTION = ("absorbed", "naive")  # How new tokens attend over a cache.
# Variable collection of kv_b_proj split per head in the layouts the absorbed products read ({'w_uk',
# 'w_uv'} beside each attention's params; infer/cached.py's `with_absorbed_weights` builds it once per
# generation). Without it each absorbed pass splits and transposes the kernel itself.
ABSORBED = "absorbed"
# Queries per block of causal self-attention: blocks of keys after a block's last query are skipped
# (128 and 64 measured alike on the tiny and small configs on CPU; one block up to T = 128).
QUERY_CHUNK = 128


def attention_mask(segment_ids_BT: jnp.ndarray, segment_ids_BS: jnp.ndarray | None = None,
                   query_positions_BT: jnp.ndarray | None = None,
                   key_positions_BS: jnp.ndarray | None = None) -> jnp.ndarray:
    """Boolean [B, 1, T, S]: causal, same document, and no padding (segment id 0) on either side.

    Without explicit positions, query t and key s are taken as sequence indices (self-attention).
    """
    if segment_ids_BS is None:
        segment_ids_BS = segment_ids_BT
    T, S = segment_ids_BT.shape[1], segment_ids_BS.shape[1]
    q_pos = jnp.arange(T)[None, :] if query_positions_BT is None else query_positions_BT
    k_pos = jnp.arange(S)[None, :] if key_positions_BS is None else key_positions_BS
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    same_doc = segment_ids_BS[:, None, :] == segment_ids_BT[:, :, None]
    valid = (segment_ids_BT[:, :, None] != 0) & (segment_ids_BS[:, None, :] != 0)
    return (causal & same_doc & valid)[:, None, :, :]


def attention_probs(q_BTHK: jnp.ndarray, k_BSHK: jnp.ndarray, mask_B1TS: jnp.ndarray) -> jnp.ndarray:
    """softmax(q.k masked) for q already scaled: float32 [B,H,T,S]."""
    scores = jnp.einsum("BTHK,BSHK->BHTS", q_BTHK, k_BSHK, preferred_element_type=jnp.float32)
    return nn.softmax(jnp.where(mask_B1TS, scores, NEG_INF), axis=-1)


def attention_core(q_BTHK: jnp.ndarray, k_BSHK: jnp.ndarray, v_BSHV: jnp.ndarray, mask_B1TS: jnp.ndarray
                   ) -> jnp.ndarray:
    """softmax(q.k masked) v for q already scaled; scores in float32. Returns [B,T,H,V] in v's dtype."""
    probs = attention_probs(q_BTHK, k_BSHK, mask_B1TS).astype(v_BSHV.dtype)
    return jnp.einsum("BHTS,BSHV->BTHV", probs, v_BSHV)


def causal_attention(q_BTHK: jnp.ndarray, k_BTHK: jnp.ndarray, v_BTHV: jnp.ndarray, segment_ids_BT: jnp.ndarray,
                     ) -> jnp.ndarray:
    """`attention_core` of a sequence over itself (causal, within documents), QUERY_CHUNK queries at a time,
    each block against the keys up to its last query only: the causal mask's upper triangle of blocks is
    never computed (about half the scores at long T). q already scaled. Returns [B,T,H,V]."""
    return jnp.concatenate([attention_core(q_BTHK[:, start:end], k_BTHK[:, :end], v_BTHV[:, :end], mask)
                            for start, end, mask in query_blocks(segment_ids_BT)], axis=1)


def query_blocks(segment_ids_BT: jnp.ndarray) -> list[tuple[int, int, jnp.ndarray]]:
    """(start, end, the mask [B,1,end-start,end] of queries start:end over keys :end) per block of
    QUERY_CHUNK queries of a sequence attending to itself."""
    T = segment_ids_BT.shape[1]
    return [(start, end, attention_mask(segment_ids_BT[:, start:end], segment_ids_BT[:, :end],
                                        jnp.arange(start, end)[None, :], jnp.arange(end)[None, :]))
            for start, end in ((s, min(s + QUERY_CHUNK, T)) for s in range(0, T, QUERY_CHUNK))]


def split_kv_b(kernel_CX: jnp.ndarray, heads: int, nope_dim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """kv_b_proj's kernel [..., C, H*(K+V)] (leading stack axes kept) split per head into W_UK [..., H, K, C]
    and W_UV [..., H, C, V]: per head, the [in, out] matrices of q_nope -> latent query and attended latent
    -> value, so the absorbed products (batched over heads) read them without a transpose."""
    *lead, C, X = kernel_CX.shape
    w_CHX = kernel_CX.reshape(*lead, C, heads, X // heads)
    return jnp.moveaxis(w_CHX[..., :nope_dim], -3, -1), jnp.swapaxes(w_CHX[..., nope_dim:], -3, -2)


def attend_gathered(q_latent_BTHC: jnp.ndarray, q_rope_BTHR: jnp.ndarray, c_kv_BSC: jnp.ndarray,
                    k_rope_BSR: jnp.ndarray, keys_BTJ: jnp.ndarray, valid_BTJ: jnp.ndarray, scale: float
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Absorbed-form attention of each query over its own J keys (sparse attention): their latents and rope
    keys are gathered per query ([B,T,J,C], [B,T,J,R]) and nothing else is read. q_latent is q_nope W_UK;
    `valid` marks real keys among `keys`. Returns (the attended latent [B,T,H,C], the attention float32
    [B,H,T,J])."""
    rows_B11 = jnp.arange(c_kv_BSC.shape[0])[:, None, None]
    c_BTJC, r_BTJR = c_kv_BSC[rows_B11, keys_BTJ], k_rope_BSR[rows_B11, keys_BTJ]
    scores = (jnp.einsum("BTHC,BTJC->BHTJ", q_latent_BTHC, c_BTJC, preferred_element_type=jnp.float32)
              + jnp.einsum("BTHR,BTJR->BHTJ", q_rope_BTHR, r_BTJR, preferred_element_type=jnp.float32)) * scale
    probs = nn.softmax(jnp.where(valid_BTJ[:, None], scores, NEG_INF), axis=-1)
    return jnp.einsum("BHTJ,BTJC->BTHC", probs.astype(c_BTJC.dtype), c_BTJC), probs


def mean_over_real(per_query_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray) -> jnp.ndarray:
    """The mean of a per-query value over the real (non-padding) queries: float32 scalar."""
    real = (segment_ids_BT != 0).astype(jnp.float32)
    return jnp.sum(per_query_BT * real) / jnp.maximum(real.sum(), 1.0)


class MLA(nn.Module):
    """x [B, T, D] -> (y [B, T, D], the new tokens' cache entries LayerCache([B, T, C], [B, T, R][, [B, T, I]])
    when given a cache, else None, the indexer's KL loss or None): see `__call__`."""

    cfg: ModelConfig
    recipe: Recipe | None = None  # The FP8 recipe of every projection (ops/recipe.py), or None.
    cached_attention: str = "absorbed"  # One of CACHED_ATTENTION; only used over a cache.

    def setup(self) -> None:
        cfg, dtype, mm = self.cfg, compute_dtype(self.cfg), self.recipe
        H = cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(H * cfg.qk_head_dim, ("embed", "heads"), dtype, recipe=mm)
        else:
            self.q_a_proj = Linear(cfg.q_lora_rank, ("embed", "q_lora"), dtype, recipe=mm)
            self.q_a_layernorm = RMSNorm(LATENT_NORM_EPS, "q_lora")
            self.q_b_proj = Linear(H * cfg.qk_head_dim, ("q_lora", "heads"), dtype, recipe=mm,
                                   checkpoint_as=remat.MLA_UP_PROJ)
        self.kv_a_proj_with_mqa = Linear(cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("embed", "kv_lora"),
                                         dtype, recipe=mm)
        self.kv_a_layernorm = RMSNorm(LATENT_NORM_EPS, "kv_lora")
        self.kv_b_proj = Linear(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads"), dtype,
                                recipe=mm, checkpoint_as=remat.MLA_UP_PROJ)
        self.o_proj = Linear(cfg.hidden_size, ("heads", "embed"), dtype, recipe=mm)
        if cfg.sparse_attention:
            self.indexer = Indexer(cfg)

    def queries(self, x_BTD: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
        """q_nope [B,T,H,K], rotated q_rope [B,T,H,R] and the normalised query latent c_Q [B,T,Q] (None
        without one)."""
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q, q_latent = self.q_proj(x_BTD), None
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x_BTD))
            q = self.q_b_proj(q_latent)
        q_BTHK = q.reshape(*x_BTD.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_rope = q_BTHK[..., :cfg.qk_nope_head_dim], q_BTHK[..., cfg.qk_nope_head_dim:]
        return q_nope, rope.apply_rotary(q_rope, cos, sin), q_latent

    def latent_kv(self, x_BTD: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """What a KV cache stores: normalised latent c_KV [B,T,C] and rotated shared k_rope [B,T,R]."""
        cfg = self.cfg
        kv = self.kv_a_proj_with_mqa(x_BTD)
        c_kv, k_rope = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        k_rope = rope.apply_rotary(k_rope[:, :, None, :], cos, sin)[:, :, 0, :]
        return self.kv_a_layernorm(c_kv), k_rope

    def up_project(self, c_kv_BSC: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Per-head k_nope [B,S,H,K] and v [B,S,H,V] from the latent."""
        cfg = self.cfg
        kv = self.kv_b_proj(c_kv_BSC)
        kv = kv.reshape(*c_kv_BSC.shape[:2], cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        return kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]

    @property
    def softmax_scale(self) -> float:
        """The scores' scale, `rope.softmax_scale` of this model (YaRN included)."""
        return rope.softmax_scale(self.cfg.qk_head_dim, self.cfg.rope_scaling)

    def project_out(self, out_BTHV: jnp.ndarray) -> jnp.ndarray:
        """The heads' outputs [B,T,H,V] through o_proj: [B,T,D]."""
        return self.o_proj(out_BTHV.reshape(*out_BTHV.shape[:2], -1))

    def joint_qkv(self, q_nope: jnp.ndarray, q_rope: jnp.ndarray, c_kv_BSC: jnp.ndarray, k_rope_BSR: jnp.ndarray
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Per-head q [B,T,H,K+R] (scaled by the softmax scale), k [B,S,H,K+R] (the shared rope key on
        every head) and v [B,S,H,V] from the latent: scores are then one product q.k, as in `attend`."""
        k_nope, v = self.up_project(c_kv_BSC)
        q = jnp.concatenate([q_nope, q_rope], axis=-1) * jnp.asarray(self.softmax_scale, q_nope.dtype)
        k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], (*k_nope.shape[:3], k_rope_BSR.shape[-1]))
        return q, jnp.concatenate([k_nope, k_rope_BSHR.astype(k_nope.dtype)], axis=-1), v

    def attend(self, q_nope: jnp.ndarray, q_rope: jnp.ndarray, c_kv_BSC: jnp.ndarray,
               k_rope_BSR: jnp.ndarray, mask_B1TS: jnp.ndarray) -> jnp.ndarray:
        """Naive MLA attention over a latent sequence (up-projected per head); returns [B,T,D]."""
        q, k, v = self.joint_qkv(q_nope, q_rope, c_kv_BSC, k_rope_BSR)
        return self.project_out(checkpoint_name(attention_core(q, k, v, mask_B1TS), remat.ATTENTION))

    def self_attend(self, q_nope: jnp.ndarray, q_rope: jnp.ndarray, c_kv_BTC: jnp.ndarray,
                    k_rope_BTR: jnp.ndarray, segment_ids_BT: jnp.ndarray, index: IndexerOutputs | None = None
                    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """`attend` over the sequence itself (`causal_attention`). Returns ([B,T,D], None), or with the
        indexer's outputs (sparse attention's dense warm-up) the indexer's KL against this attention over
        every allowed key as the second item."""
        q, k, v = self.joint_qkv(q_nope, q_rope, c_kv_BTC, k_rope_BTR)
        if index is None:
            out_BTHV, kl = causal_attention(q, k, v, segment_ids_BT), None
        else:
            chunks, kls = [], []
            for start, end, mask in query_blocks(segment_ids_BT):
                probs = attention_probs(q[:, start:end], k[:, :end], mask)
                chunks.append(jnp.einsum("BHTS,BSHV->BTHV", probs.astype(v.dtype), v[:, :end]))
                scores = index_scores(index[0][:, start:end], index[1][:, start:end], index[2][:, :end])
                kls.append(indexer_kl(probs.sum(axis=1), scores, mask[:, 0]))
            out_BTHV = jnp.concatenate(chunks, axis=1)
            kl = mean_over_real(jnp.concatenate(kls, axis=1), segment_ids_BT)
        return self.project_out(checkpoint_name(out_BTHV, remat.ATTENTION)), kl

    def self_attend_sparse(self, q_nope: jnp.ndarray, q_rope: jnp.ndarray, c_kv_BTC: jnp.ndarray,
                           k_rope_BTR: jnp.ndarray, segment_ids_BT: jnp.ndarray, index: IndexerOutputs,
                           with_kl: bool = False) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Sparse attention over the sequence itself, a block of QUERY_CHUNK queries at a time (`lax.map`, so
        one block's temporaries are alive at once): the indexer scores the block's queries against every
        key, and each query attends to its top index_topk allowed keys only (`attend_gathered`: MLA's
        shared-latent form, in which the V3.2 report builds DSA). Attention is O(T k); no [T, T] score matrix
        exists per head, and the indexer's scores exist for one block, [B, QUERY_CHUNK, T]. Returns ([B,T,D],
        the indexer's KL against this attention over each query's selected keys when `with_kl`, else None)."""
        cfg = self.cfg
        B, T = q_nope.shape[:2]
        block = min(QUERY_CHUNK, T)
        q_index, weights, keys = index
        q_latent = self.absorbed_queries(q_nope)
        key_positions = jnp.arange(T)[None, :]

        def attend_block(start: jnp.ndarray, size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)  # noqa: E731
            allowed = attention_mask(take(segment_ids_BT), segment_ids_BT, start + jnp.arange(size)[None, :],
                                     key_positions)[:, 0]
            scores = index_scores(take(q_index), take(weights), keys)
            selected, valid = top_k_keys(scores, allowed, cfg.index_topk)
            out, probs = attend_gathered(take(q_latent), take(q_rope), c_kv_BTC, k_rope_BTR, selected, valid,
                                         self.softmax_scale)
            kl = (indexer_kl(probs.sum(axis=1), jnp.take_along_axis(scores, selected, axis=-1), valid) if with_kl
                  else jnp.zeros((B, size), jnp.float32))
            return out, kl

        whole = T // block * block
        if whole == T == block:
            out_BTHC, kl_BT = attend_block(jnp.asarray(0), T)
        else:
            outs, kls = jax.lax.map(lambda start: attend_block(start, block), jnp.arange(0, whole, block))
            out_BTHC = jnp.moveaxis(outs, 0, 1).reshape(B, whole, *outs.shape[3:])
            kl_BT = jnp.moveaxis(kls, 0, 1).reshape(B, whole)
        if whole < T:  # A last, shorter block.
            out, kl = attend_block(jnp.asarray(whole), T - whole)
            out_BTHC, kl_BT = jnp.concatenate([out_BTHC, out], axis=1), jnp.concatenate([kl_BT, kl], axis=1)
        return self.absorbed_output(out_BTHC), (mean_over_real(kl_BT, segment_ids_BT) if with_kl else None)

    def attend_absorbed(self, q_nope: jnp.ndarray, q_rope: jnp.ndarray, c_kv_BSC: jnp.ndarray,
                        k_rope_BSR: jnp.ndarray, mask_B1TS: jnp.ndarray) -> jnp.ndarray:
        """`attend` with kv_b_proj absorbed (DeepSeek's inference form); returns [B,T,D].

        W_UK (kv_b_proj's key half) is folded into the query and W_UV applied to the attended latent, so
        nothing per head is materialised over the S keys:
            scores = (q_nope W_UK^T) . c_KV + q_rope . k_rope,   out = (softmax(scores) c_KV) W_UV W_O.
        Equal to `attend` up to rounding; the weight matmuls here are plain (no FP8 recipe).
        """
        q_latent_BTHC = self.absorbed_queries(q_nope)
        scores = (jnp.einsum("BTHC,BSC->BHTS", q_latent_BTHC, c_kv_BSC, preferred_element_type=jnp.float32)
                  + jnp.einsum("BTHR,BSR->BHTS", q_rope, k_rope_BSR, preferred_element_type=jnp.float32))
        probs = nn.softmax(jnp.where(mask_B1TS, scores * self.softmax_scale, NEG_INF), axis=-1)
        return self.absorbed_output(jnp.einsum("BHTS,BSC->BTHC", probs.astype(c_kv_BSC.dtype), c_kv_BSC))

    def absorbed_queries(self, q_nope: jnp.ndarray) -> jnp.ndarray:
        """q_nope W_UK^T: each head's query in the latent space, [B,T,H,C] (scores are then q . c_KV)."""
        w_uk_HKC, _ = self.absorbed_weights(q_nope.dtype)
        return jnp.einsum("BTHK,HKC->BTHC", q_nope, w_uk_HKC)

    def absorbed_output(self, out_BTHC: jnp.ndarray) -> jnp.ndarray:
        """The attended latents [B,T,H,C] through W_UV per head and o_proj: [B,T,D]."""
        _, w_uv_HCV = self.absorbed_weights(out_BTHC.dtype)
        return self.project_out(jnp.einsum("BTHC,HCV->BTHV", out_BTHC, w_uv_HCV))

    def absorbed_weights(self, dtype: jnp.dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
        """W_UK [H,K,C] and W_UV [H,C,V] (`split_kv_b`) in `dtype`: from the ABSORBED collection when the
        caller built it, else split from kv_b_proj's kernel here."""
        cfg = self.cfg
        if self.has_variable(ABSORBED, "w_uk"):
            return (self.get_variable(ABSORBED, "w_uk").astype(dtype),
                    self.get_variable(ABSORBED, "w_uv").astype(dtype))
        if self.is_initializing():  # Sparse attention reads the kernel without calling the layer: create it.
            self.kv_b_proj(jnp.zeros((1, cfg.kv_lora_rank), dtype))
        kernel = nn.meta.unbox(self.kv_b_proj.variables["params"]["kernel"]).astype(dtype)
        return split_kv_b(kernel, cfg.num_attention_heads, cfg.qk_nope_head_dim)

    def attend_selected(self, q_nope: jnp.ndarray, q_rope: jnp.ndarray, c_kv_BSC: jnp.ndarray,
                        k_rope_BSR: jnp.ndarray, keys_BTJ: jnp.ndarray, valid_BTJ: jnp.ndarray) -> jnp.ndarray:
        """`attend_absorbed` over each query's own J selected keys (`attend_gathered`), so a decoded token's
        attention costs O(J) whatever the context. Returns [B,T,D]."""
        out_BTHC, _ = attend_gathered(self.absorbed_queries(q_nope), q_rope, c_kv_BSC, k_rope_BSR, keys_BTJ,
                                      valid_BTJ, self.softmax_scale)
        return self.absorbed_output(out_BTHC)

    def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray,
                 cache: LayerCache | None = None, lengths_B: jnp.ndarray | None = None
                 ) -> tuple[jnp.ndarray, LayerCache | None, jnp.ndarray | None]:
        """Self-attention within each document (segment ids), or, given one layer's cache [B, S, *] and
        its valid lengths [B], the new tokens over [cache ; themselves] (positions = their slots).

        Returns (y [B,T,D], the new tokens' cache entries or None, the indexer's KL loss (a float32 scalar,
        without a cache and with cfg.indexer_loss != 'off') or None). The indexer reads its inputs through
        a stop-gradient: the language-model loss never trains it (top-k is not differentiable anyway), and
        its own loss trains nothing else."""
        cfg = self.cfg
        cos, sin = rope.cos_sin(positions_BT, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        q_nope, q_rope, q_latent = self.queries(x_BTD, cos, sin)
        c_kv, k_rope = self.latent_kv(x_BTD, cos, sin)
        index = None
        if cfg.sparse_attention:
            detached = jax.lax.stop_gradient
            index = self.indexer(detached(x_BTD), detached(q_latent), cos, sin)
        if cache is None:
            if index is None or cfg.indexer_loss == "dense":  # Dense attention (V3, or DSA's warm-up).
                out, kl = self.self_attend(q_nope, q_rope, c_kv, k_rope, segment_ids_BT, index)
            else:
                out, kl = self.self_attend_sparse(q_nope, q_rope, c_kv, k_rope, segment_ids_BT, index,
                                                  with_kl=cfg.indexer_loss == "sparse")
            return out, None, kl
        chex.assert_rank([cache.c_kv, cache.k_rope, lengths_B], [3, 3, 1])
        past = lambda cached, new: jnp.concatenate([cached.astype(new.dtype), new], axis=1)  # noqa: E731
        keys_c, keys_r = past(cache.c_kv, c_kv), past(cache.k_rope, k_rope)
        mask = past_mask(lengths_B, cache.c_kv.shape[1], x_BTD.shape[1])
        if index is None:
            attend = self.attend_absorbed if self.cached_attention == "absorbed" else self.attend
            return attend(q_nope, q_rope, keys_c, keys_r, mask), LayerCache(c_kv, k_rope), None
        entries = LayerCache(c_kv, k_rope, index[2])
        index_keys = past(cache.index_k, index[2])
        scores = index_scores(index[0], index[1], index_keys)
        if self.cached_attention == "naive":  # The reference: every key scored, the unselected masked.
            mask = mask & top_k_mask(scores, mask[:, 0], self.cfg.index_topk)[:, None]
            return self.attend(q_nope, q_rope, keys_c, keys_r, mask), entries, None
        selected, valid = top_k_keys(scores, mask[:, 0], self.cfg.index_topk)
        return self.attend_selected(q_nope, q_rope, keys_c, keys_r, selected, valid), entries, None
