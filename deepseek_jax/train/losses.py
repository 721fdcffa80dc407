"""The training objective, in one place: next-token and MTP cross entropies (DeepSeek-V3 eqs. 24-25),
the sequence-wise balance loss, and the step's metrics.

Legend: B batch, T time, V vocabulary, P MTP depth.

    loss = CE(main) + lambda(step) * mean_k CE(MTP_k) + alpha * mean over MoE layers of the balance loss

A row of `tokens` [B, T] is both input and labels: position i is scored on token i + offset, where the
main head uses offset 1 and MTP depth k (1-based) offset k + 1. A position counts only if its label
exists inside the row (i + offset < T), belongs to the same document (equal segment ids) and is not
padding (segment id 0). No label past the end of the row is ever read.

Each cross entropy is a sum over the positions with a label divided by their count. `LossTerms` carries
the sums and counts, so a pipeline (train/pipelined.py) computes them per micro-batch, normalises with
the whole batch's counts (`language_loss(..., counts=target_counts(...))`) and takes each stage's share
of the balance loss (`balance_term(..., num_layers=...)`): the plain and the pipelined step then
optimise the same number and report the same metrics (`step_metrics`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import balance


class LossTerms(NamedTuple):
    """Summed token losses (nats) and the number of positions with a label."""

    main_sum: jnp.ndarray  # []
    main_count: jnp.ndarray  # []
    mtp_sums: jnp.ndarray  # [P]
    mtp_counts: jnp.ndarray  # [P]


def shifted_targets(tokens_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray, offset: int
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(labels [B, T] int32, mask [B, T] float32) for predicting token i + offset at position i."""
    B, T = tokens_BT.shape
    if offset >= T:
        return jnp.zeros_like(tokens_BT), jnp.zeros((B, T), jnp.float32)
    pad = jnp.zeros((B, offset), tokens_BT.dtype)
    labels = jnp.concatenate([tokens_BT[:, offset:], pad], axis=1)
    label_segments = jnp.concatenate([segment_ids_BT[:, offset:], pad], axis=1)
    in_row = jnp.arange(T)[None, :] < T - offset
    mask = in_row & (label_segments == segment_ids_BT) & (segment_ids_BT != 0)
    return labels, mask.astype(jnp.float32)


def masked_cross_entropy(logits_BTV: jnp.ndarray, labels_BT: jnp.ndarray, mask_BT: jnp.ndarray
                         ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of -log p(label) over masked positions, number of positions), both float32 scalars."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), labels_BT)
    return jnp.sum(nll * mask_BT), jnp.sum(mask_BT)


def next_token_loss(logits_BTV: jnp.ndarray, tokens_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of token losses, token count) of the main head."""
    labels, mask = shifted_targets(tokens_BT, segment_ids_BT, 1)
    return masked_cross_entropy(logits_BTV, labels, mask)


def mtp_losses(mtp_logits_PBTV: jnp.ndarray, tokens_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-depth (sums [P], counts [P]) of the MTP heads; depth k (0-based) predicts token i + k + 2."""
    sums, counts = [], []
    for k in range(mtp_logits_PBTV.shape[0]):
        labels, mask = shifted_targets(tokens_BT, segment_ids_BT, k + 2)
        s, c = masked_cross_entropy(mtp_logits_PBTV[k], labels, mask)
        sums.append(s)
        counts.append(c)
    return jnp.stack(sums), jnp.stack(counts)


def loss_terms(logits_BTV: jnp.ndarray, mtp_logits_PBTV: jnp.ndarray | None, tokens_BT: jnp.ndarray,
               segment_ids_BT: jnp.ndarray) -> LossTerms:
    """The sums and counts of the main head and of every MTP depth (none without MTP logits)."""
    main_sum, main_count = next_token_loss(logits_BTV, tokens_BT, segment_ids_BT)
    if mtp_logits_PBTV is None:
        return LossTerms(main_sum, main_count, jnp.zeros((0,)), jnp.zeros((0,)))
    return LossTerms(main_sum, main_count, *mtp_losses(mtp_logits_PBTV, tokens_BT, segment_ids_BT))


def target_counts(tokens_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray, num_mtp: int
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(positions with a main label [], with an MTP label per depth [P]) of a batch, without any logits."""
    main = shifted_targets(tokens_BT, segment_ids_BT, 1)[1].sum()
    if not num_mtp:
        return main, jnp.zeros((0,))
    return main, jnp.stack([shifted_targets(tokens_BT, segment_ids_BT, k + 2)[1].sum() for k in range(num_mtp)])


def language_loss(terms: LossTerms, mtp_weight: jnp.ndarray,
                  counts: tuple[jnp.ndarray, jnp.ndarray] | None = None) -> jnp.ndarray:
    """CE(main) + lambda * mean_k CE(MTP_k), each a sum over `counts` positions (default: the terms' own)."""
    main_count, mtp_counts = (terms.main_count, terms.mtp_counts) if counts is None else counts
    loss = terms.main_sum / jnp.maximum(main_count, 1.0)
    if terms.mtp_sums.size:
        loss = loss + mtp_weight * jnp.mean(terms.mtp_sums / jnp.maximum(mtp_counts, 1.0))
    return loss


def balance_term(layer_losses: jnp.ndarray, alpha: float, num_layers: int | None = None) -> jnp.ndarray:
    """alpha x the mean of the MoE layers' balance losses [n]. Given `num_layers`, `layer_losses` are some
    of the model's num_layers MoE layers (a pipeline stage's) and their share, alpha / num_layers x their
    sum, is returned."""
    if num_layers is None:
        return alpha * layer_losses.mean()
    return alpha / num_layers * jnp.sum(layer_losses)


def num_balanced_layers(cfg: ModelConfig) -> int:
    """The MoE layers the balance loss averages over: the MoE stack and, with experts, the MTP blocks."""
    return cfg.num_moe_layers + (cfg.num_nextn_predict_layers if cfg.mtp_uses_moe else 0)


def indexer_loss(router_stats: dict) -> jnp.ndarray | None:
    """The mean over layers of the lightning indexers' KL (sparse attention's indexer training,
    model/indexer.py), or None when no layer reports one."""
    kl = [jnp.atleast_1d(s["indexer_kl"]) for s in router_stats.values() if "indexer_kl" in s]
    return jnp.concatenate(kl).mean() if kl else None


def step_metrics(terms: LossTerms, router_stats: dict, loss: jnp.ndarray,
                 cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """What a training step reports: the losses, tokens scored, balance loss and MaxVio (mean and per
    MoE layer, MTP blocks last), pairs dropped by an expert-parallel capacity, and the total loss."""
    metrics = {"main_loss": terms.main_sum / jnp.maximum(terms.main_count, 1.0), "tokens": terms.main_count}
    if terms.mtp_sums.size:
        metrics["mtp_loss"] = jnp.mean(terms.mtp_sums / jnp.maximum(terms.mtp_counts, 1.0))
    max_vio, balance_losses = balance.moe_stats(router_stats)
    if balance_losses.size:
        metrics.update(balance_loss=balance_losses.mean(), max_vio=max_vio.mean(), max_vio_per_layer=max_vio)
    indexer_kl = indexer_loss(router_stats)
    if indexer_kl is not None:
        metrics["indexer_kl"] = indexer_kl
    if cfg.moe_capacity_factor:
        metrics["dropped_pairs"] = sum(s["dropped"].sum() for s in router_stats.values() if "dropped" in s)
    metrics["loss"] = loss
    return metrics
