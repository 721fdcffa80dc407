"""Language-modelling losses: next-token cross entropy and the MTP losses (DeepSeek-V3 eqs. 24-25).

Legend: B batch, T time, V vocabulary, P MTP depth.

A row of `tokens` [B, T] is both input and labels: position i is scored on token i + offset, where the
main head uses offset 1 and MTP depth k (1-based) offset k + 1. A position counts only if its label
exists inside the row (i + offset < T), belongs to the same document (equal segment ids) and is not
padding (segment id 0). No label past the end of the row is ever read.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


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
