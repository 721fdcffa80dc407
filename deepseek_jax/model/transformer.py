"""The DeepSeek-V3 model, composed of its pieces: embedding, dense stack, MoE stack, output heads, MTP.

Legend: B batch, T time, D model, V vocabulary, L layers, E routed experts, P MTP depth, S cache slots.

    DeepSeekV3.__call__ = output_heads . moe . embed_and_dense
      embed_and_dense   token embedding, then the dense stack                  (a pipeline's first stage)
      moe               the MoE stack; a pipeline stage runs a slice of it, the same module built with
                        the slice's length (`layer_stack(cfg, MOE, length)`)
      output_heads      final norm and output head, then MTP depth by depth (`mtp`), each reading the
                        shared embedding and head                              (a pipeline's last stage)
Every piece takes an optional decode cache (model/cache.py) and returns it with the new tokens' entries
written, so training, the pipeline's stage function (train/pipelined.py) and decoding (infer/) all run
these pieces and nothing else. Layers of one kind run under `nn.scan` (`layer_stack`).

Variables: {'params': ..., 'routing': {<stack or mtp_k>: ... e_score_correction_bias [L, E] or [E]}}, and
the router statistics come back under the same names (model/names.py):
    {'moe_layers': {'expert_counts': [L, E], 'balance_loss': [L], 'dropped': [L]}, 'mtp_0': {...: [E]}, ...}
(dense layers route nothing and report nothing, but the lightning indexers' KL of sparse attention while
it trains them: 'indexer_kl' [L] (or [] for an MTP block) beside the router statistics of every stack).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.model import remat
from deepseek_jax.model.block import recomputed_block
from deepseek_jax.model.cache import KVCache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.experts import Dispatch
from deepseek_jax.model.layers import Linear, RMSNorm, compute_dtype
from deepseek_jax.model.mla import ABSORBED, CACHED_ATTENTION
from deepseek_jax.model.moe import ROUTING
from deepseek_jax.model.mtp import MTPModule, shift_left
from deepseek_jax.model.names import DENSE, LAYER_AXIS, MOE, MTP_CACHE, mtp_name, stack_lengths
from deepseek_jax.ops.recipe import Recipe, check_recipe


class ModelOutput(NamedTuple):
    logits: jnp.ndarray  # [B, T, V] float32: position i predicts token i+1.
    mtp_logits: jnp.ndarray | None  # [P, B, T, V] float32: depth k (0-based) at i predicts token i+k+2.
    router_stats: dict  # See the module docstring.
    hidden: jnp.ndarray  # [B, T, D]: the final-normed hidden state, the head's input and MTP's h^0.
    cache: KVCache | None  # The decode cache given, with the new tokens' entries written (lengths unchanged).


def layer_stack(cfg: ModelConfig, name: str, length: int | None = None, *, recipe: Recipe | None = None,
                dispatch: Dispatch | None = None, cached_attention: str = "absorbed",
                unrolled: bool = False) -> nn.Module:
    """Stack `name` (DENSE or MOE) as one scanned module of `length` layers (default: all of them), with
    the configured recomputation; its leading axis is named LAYER_AXIS[name] (model/names.py).
    `unrolled` (or cfg.scan_layers False): no loop in the compiled program (the layers' ops in the caller's
    computation, where a scheduler can overlap them with independent work; compile time grows with `length`).

    Call: (x [B, T, D], positions [B, T], segment_ids [B, T], cache LayerCache [L, B, S, *] | None,
    lengths [B] | None) -> (x, (router stats [L, ...], new cache entries [L, B, T, *] | None)).
    """
    length = stack_lengths(cfg)[name] if length is None else length
    scanned = nn.scan(
        recomputed_block(cfg),
        variable_axes={"params": 0, ROUTING: 0, ABSORBED: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),  # positions, segments, cache, lengths
        length=length,
        unroll=length if unrolled or not cfg.scan_layers else 1,
        metadata_params={nn.PARTITION_NAME: LAYER_AXIS[name]},
    )
    return scanned(cfg, name == MOE, recipe=recipe, dispatch=dispatch, cached_attention=cached_attention)


def default_positions(tokens_BT: jnp.ndarray, cache: KVCache | None = None) -> jnp.ndarray:
    """0..T-1 in every row, or the new tokens' slots in `cache` (lengths .. lengths+T-1)."""
    if cache is not None:
        return cache.positions(tokens_BT.shape[1])
    return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None, :], tokens_BT.shape)


class DeepSeekV3(nn.Module):
    """tokens [B, T] int32 -> ModelOutput.

    positions [B, T]: rope positions (default 0..T-1, or the cache slots). segment_ids [B, T]: document of
    each token in a packed row, 0 = padding (default all 1); attention never crosses documents. With a
    cache, attention runs over the cache instead (segment ids then only mark padding for the router).
    """

    cfg: ModelConfig
    recipe: Recipe | None = None  # The FP8 recipe of every eligible Linear and the routed experts, or None.
    dispatch: Dispatch | None = None  # The injected implementation of moe_dispatch='ep' (model/experts.py).
    cached_attention: str = "absorbed"  # Attention over a decode cache: one of CACHED_ATTENTION.

    def setup(self) -> None:
        cfg = self.cfg
        check_recipe(self.recipe, "DeepSeekV3")
        if self.cached_attention not in CACHED_ATTENTION:
            raise ValueError(f"cached_attention={self.cached_attention!r}: use one of {CACHED_ATTENTION}")
        pieces = dict(recipe=self.recipe, dispatch=self.dispatch, cached_attention=self.cached_attention)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        for name in stack_lengths(cfg):
            setattr(self, name, layer_stack(cfg, name, **pieces))
        self.norm = RMSNorm(cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), compute_dtype(cfg), high_precision=True,
                              checkpoint_as=remat.LOGITS)
        self.mtp_modules = [MTPModule(cfg, **pieces, name=mtp_name(k)) for k in range(cfg.num_nextn_predict_layers)]

    # -- the pieces -----------------------------------------------------------------------------------

    def embed(self, tokens_BT: jnp.ndarray) -> jnp.ndarray:
        """Token ids [B, T] -> embeddings [B, T, D] in the compute dtype."""
        return self.embed_tokens(tokens_BT)

    def logits(self, h_BTD: jnp.ndarray) -> jnp.ndarray:
        """The output head: final-normed hidden [B, T, D] -> float32 logits [B, T, V]."""
        return self.lm_head(h_BTD).astype(jnp.float32)

    def stack(self, name: str, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray,
              cache: KVCache | None = None) -> tuple[jnp.ndarray, dict, KVCache | None]:
        """Runs stack `name` (if the model has it): (x, {name: its router stats} or {}, cache)."""
        if name not in stack_lengths(self.cfg):
            return x_BTD, {}, cache
        past, lengths = (None, None) if cache is None else (cache.layers[name], cache.lengths)
        x_BTD, (stats, entries) = getattr(self, name)(x_BTD, positions_BT, segment_ids_BT, past, lengths)
        if cache is not None:
            cache = cache.write(name, entries)
        return x_BTD, ({name: stats} if stats else {}), cache

    def embed_and_dense(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray,
                        cache: KVCache | None = None) -> tuple[jnp.ndarray, dict, KVCache | None]:
        """Tokens [B, T] -> (the dense stack's output [B, T, D], its stats: {} or, while a sparse-attention
        model trains its indexers, {'dense_layers': {'indexer_kl': [L]}}, the cache)."""
        return self.stack(DENSE, self.embed(tokens_BT), positions_BT, segment_ids_BT, cache)

    def moe(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray,
            cache: KVCache | None = None) -> tuple[jnp.ndarray, dict, KVCache | None]:
        """The MoE stack: (x [B, T, D], {'moe_layers': router stats}, cache)."""
        return self.stack(MOE, x_BTD, positions_BT, segment_ids_BT, cache)

    def mtp(self, depth: int, h_prev_BTD: jnp.ndarray, tokens_ahead_BT: jnp.ndarray, positions_BT: jnp.ndarray,
            segment_ids_BT: jnp.ndarray, cache: KVCache | None = None
            ) -> tuple[jnp.ndarray, jnp.ndarray, dict, KVCache | None]:
        """MTP module `depth` (0-based): at position i it reads h^{depth}_i and the token depth+1 steps ahead,
        t_{i+depth+1} (tokens_ahead), and predicts t_{i+depth+2}.

        Returns (h^{depth+1} [B, T, D], logits [B, T, V], its router stats, cache with the depth's entries).
        """
        past, lengths = None, None
        if cache is not None:
            if MTP_CACHE not in cache.layers:
                raise ValueError("this cache holds no MTP layers: make it with init_cache(..., mtp=True)")
            past, lengths = jax.tree.map(lambda a: a[depth], cache.layers[MTP_CACHE]), cache.lengths
        h, (stats, entries) = self.mtp_modules[depth](h_prev_BTD, self.embed(tokens_ahead_BT), positions_BT,
                                                      segment_ids_BT, past, lengths)
        if cache is not None:
            cache = cache.write(MTP_CACHE, entries, layer=depth)
        return h, self.logits(h), stats, cache

    def output_heads(self, x_BTD: jnp.ndarray, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray,
                     segment_ids_BT: jnp.ndarray, run_mtp: bool = True, cache: KVCache | None = None
                     ) -> tuple[jnp.ndarray, jnp.ndarray | None, jnp.ndarray, dict, KVCache | None]:
        """Final norm and head, then every MTP depth (teacher-forced on `tokens`).

        Returns (logits [B, T, V], MTP logits [P, B, T, V] or None, final-normed hidden [B, T, D],
        {'mtp_k': router stats} of the MoE blocks, cache).
        """
        h = self.norm(x_BTD)
        chex.assert_shape(h, (*tokens_BT.shape, self.cfg.hidden_size))
        logits, mtp_logits, stats, h_k = self.logits(h), [], {}, h
        for k in range(self.cfg.num_nextn_predict_layers if run_mtp else 0):
            h_k, depth_logits, depth_stats, cache = self.mtp(
                k, h_k, shift_left(tokens_BT, k + 1), positions_BT, segment_ids_BT, cache)
            mtp_logits.append(depth_logits)
            if depth_stats:  # A dense MTP block routes nothing.
                stats[mtp_name(k)] = depth_stats
        return logits, (jnp.stack(mtp_logits) if mtp_logits else None), h, stats, cache

    # -- the whole model ------------------------------------------------------------------------------

    def __call__(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
                 segment_ids_BT: jnp.ndarray | None = None, run_mtp: bool = True,
                 cache: KVCache | None = None) -> ModelOutput:
        chex.assert_rank(tokens_BT, 2)
        positions = default_positions(tokens_BT, cache) if positions_BT is None else positions_BT
        segments = jnp.ones_like(tokens_BT) if segment_ids_BT is None else segment_ids_BT
        chex.assert_equal_shape([tokens_BT, positions, segments])
        x, dense_stats, cache = self.embed_and_dense(tokens_BT, positions, segments, cache)
        x, stats, cache = self.moe(x, positions, segments, cache)
        logits, mtp_logits, h, mtp_stats, cache = self.output_heads(x, tokens_BT, positions, segments, run_mtp,
                                                                    cache)
        return ModelOutput(logits, mtp_logits, {**dense_stats, **stats, **mtp_stats}, h, cache)
