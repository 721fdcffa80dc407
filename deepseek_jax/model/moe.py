"""DeepSeekMoE: the gate (router) and the MoE layer (DeepSeek-V3 section 2.1.2).

Legend: B batch, T time, N tokens (B*T), D model, E routed experts, G expert groups, K experts per token.

Gate, for each token (all in float32):
    s      = sigmoid(x W_gate)  (or softmax)                          affinities [N, E]
    choice = s + b             where b is the loss-free balancing bias (selection only)
    group  = sum of the top-2 `choice` in each group (max of `s` without a bias)   [N, G]
    keep the `topk_group` best groups, then the top-K experts of `choice` within them
    g      = s at those experts (never `choice`: the bias must not touch the weights),
             normalised to sum 1 if `norm_topk_prob`, times `routed_scaling_factor`
Output: y = sum_k g_k * Expert_{i_k}(x) + SharedExperts(x).

The bias `e_score_correction_bias` lives in the 'routing' variable collection: state updated by the
trainer from expert loads (train/balance.py), not a trained parameter.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.model import experts as experts_lib
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import MLP
from deepseek_jax.ops.recipe import Recipe

ROUTING = "routing"  # Variable collection of the balancing biases.


def affinities(logits_NE: jnp.ndarray, scoring_func: str) -> jnp.ndarray:
    """Token-to-expert affinities s [N, E] in float32."""
    logits = logits_NE.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def select_experts(scores_NE: jnp.ndarray, bias_E: jnp.ndarray | None, cfg: ModelConfig
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Group-limited top-K routing. Returns (weights [N, K] float32, expert indices [N, K] int32).

    Ties go to the lower index (lax.top_k's order), both for groups and for experts.
    """
    N, E = scores_NE.shape
    choice = scores_NE if bias_E is None else scores_NE + bias_E[None, :]
    if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
        grouped = choice.reshape(N, cfg.n_group, E // cfg.n_group)
        if bias_E is None:
            group_scores = grouped.max(axis=-1)
        else:
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        group_kept = jnp.zeros((N, cfg.n_group), bool).at[jnp.arange(N)[:, None], top_groups].set(True)
        expert_kept = jnp.repeat(group_kept, E // cfg.n_group, axis=-1)
        choice = jnp.where(expert_kept, choice, -jnp.inf)
    if cfg.node_limit:
        choice = limit_to_nodes(choice, cfg.node_groups, cfg.node_limit, cfg.num_experts_per_tok // cfg.node_limit)
    _, indices = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores_NE, indices, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices.astype(jnp.int32)


def limit_to_nodes(choice_NE: jnp.ndarray, groups: int, limit: int, per_group: int) -> jnp.ndarray:
    """Node-limited routing: `choice` with -inf outside each token's `limit` best of `groups` contiguous
    expert groups (one per device group), a group scored by the sum of its `per_group` highest choices."""
    N, E = choice_NE.shape
    grouped = choice_NE.reshape(N, groups, E // groups)
    _, best = jax.lax.top_k(jax.lax.top_k(grouped, per_group)[0].sum(axis=-1), limit)
    kept = jnp.zeros((N, groups), bool).at[jnp.arange(N)[:, None], best].set(True)
    return jnp.where(jnp.repeat(kept, E // groups, axis=-1), choice_NE, -jnp.inf)


def sequence_balance_loss(scores_BTE: jnp.ndarray, indices_BTK: jnp.ndarray, valid_BT: jnp.ndarray
                          ) -> jnp.ndarray:
    """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences (V3 eqs. 17-20).

    f_i = E / (K T) * (tokens of the sequence routed to i); P_i = mean over the sequence of the
    affinities normalised to sum 1 per token. The caller multiplies by the tiny alpha.
    """
    E, K = scores_BTE.shape[-1], indices_BTK.shape[-1]
    valid = valid_BT.astype(jnp.float32)
    tokens = jnp.maximum(valid.sum(axis=1), 1.0)  # [B]
    selected = jax.nn.one_hot(indices_BTK, E, dtype=jnp.float32).sum(axis=2)  # [B, T, E]
    f = jnp.einsum("BTE,BT->BE", selected, valid) * (E / K) / tokens[:, None]
    normalised = scores_BTE / scores_BTE.sum(axis=-1, keepdims=True)
    p = jnp.einsum("BTE,BT->BE", normalised, valid) / tokens[:, None]
    return jnp.mean(jnp.sum(f * p, axis=-1))


class Gate(nn.Module):
    """x [N, D] -> (weights [N, K], indices [N, K], affinities [N, E])."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_ND: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        cfg = self.cfg
        E = cfg.n_routed_experts
        # The router stays in float32 (report section 3.3.1): bf16 routing flips expert choices.
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   ("embed", "router")),
                            (x_ND.shape[-1], E), jnp.float32)
        scores = affinities(jnp.dot(x_ND.astype(jnp.float32), kernel), cfg.scoring_func)
        bias = None
        if cfg.uses_correction_bias:
            bias = self.variable(ROUTING, "e_score_correction_bias", jnp.zeros, (E,), jnp.float32).value
        weights, indices = select_experts(scores, bias, cfg)
        return weights, indices, scores


class MoE(nn.Module):
    """x [B, T, D] -> (y [B, T, D], stats).

    stats: 'expert_counts' [E] float32 (tokens routed to each expert, padding excluded),
    'balance_loss' scalar (the un-weighted sequence-wise balance loss) and 'dropped' scalar ((token, expert)
    pairs over the expert-parallel capacity, padding included; always 0 when dropless).
    """

    cfg: ModelConfig
    recipe: Recipe | None = None
    dispatch: experts_lib.Dispatch | None = None  # The injected 'ep' dispatch (model/experts.py).

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray, valid_BT: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
        cfg = self.cfg
        B, T, D = x_BTD.shape
        chex.assert_shape(valid_BT, (B, T))
        x_ND = x_BTD.reshape(B * T, D)
        weights, indices, scores = Gate(cfg, name="gate")(x_ND)
        routed, dropped = experts_lib.RoutedExperts(cfg, recipe=self.recipe, dispatch=self.dispatch,
                                                    name="experts")(x_ND, weights, indices)
        y = routed.reshape(B, T, D)
        if cfg.n_shared_experts:
            shared = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, recipe=self.recipe,
                         name="shared_experts")
            y = y + shared(x_BTD)
        valid = valid_BT.reshape(B * T).astype(jnp.float32)
        counts = jnp.einsum("NE,N->E", jax.nn.one_hot(indices, cfg.n_routed_experts).sum(axis=1), valid)
        stats = {
            "expert_counts": counts,
            "balance_loss": sequence_balance_loss(
                scores.reshape(B, T, -1), indices.reshape(B, T, -1), valid_BT),
            "dropped": dropped,
        }
        return y.astype(x_BTD.dtype), stats
