"""AdamW with DeepSeek-V3's settings and its learning-rate shape (report section 4.2).

beta1 0.9, beta2 0.95, weight decay 0.1 on matrices only (norm scales and biases are 1-D and exempt),
global-norm clipping at 1.0, and a schedule that warms up linearly, holds, then decays by cosine.
Master weights are float32; the moments can be bfloat16 as in the report.

DeepSeek Sparse Attention's dense warm-up (V3.2 report, section 2.1.1: `train.indexer_stage='dense_warmup'`)
trains the lightning indexer alone: the step zeroes every other gradient (`frozen_outside_indexer`) and weight
decay applies to the indexer's matrices only, so the rest of the model stays bit for bit what it was, and the
optimizer state keeps one layout in both stages (a stage-2 run starts from a warm-up run's weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

# train.indexer_stage -> the model's indexer_loss (model/config.py): which attention runs and what the KL sees.
INDEXER_STAGES = {"": "off", "dense_warmup": "dense", "sparse": "sparse"}


def learning_rate_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `learning_rate`, constant until `decay_start` x steps, cosine to `final_lr_fraction`."""
    decay_begin = max(int(c.decay_start * c.steps), c.warmup_steps)
    decay_steps = max(c.steps - decay_begin, 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1)),
         optax.constant_schedule(c.learning_rate),
         optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=c.final_lr_fraction)],
        boundaries=[c.warmup_steps, decay_begin])


def decay_mask(params) -> object:
    """True for the matrices weight decay applies to. Decided by name, not rank: a stack of norm scales
    is [L, D] but still exempt."""
    def is_matrix(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in ("scale", "bias") and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def trains_indexer_only(c: ml_collections.ConfigDict) -> bool:
    """Sparse attention's dense warm-up: only the lightning indexer learns."""
    return c.get("indexer_stage", "") == "dense_warmup"


def indexer_leaves(tree) -> object:
    """True at the leaves of the lightning indexers (every path through a module named 'indexer')."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "indexer" for k in path), tree)


def frozen_outside_indexer(grads, c: ml_collections.ConfigDict):
    """`grads` with every leaf outside the indexers zeroed during the dense warm-up (else unchanged)."""
    if not trains_indexer_only(c):
        return grads
    return jax.tree.map(lambda g, keep: g if keep else jnp.zeros_like(g), grads, indexer_leaves(grads))


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The full update rule from `config.train`."""
    mu_dtype = jnp.dtype(c.moment_dtype) if c.moment_dtype else None
    mask = decay_mask
    if trains_indexer_only(c):
        mask = lambda params: jax.tree.map(bool.__and__, decay_mask(params), indexer_leaves(params))  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(c.clip_norm),
        optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, mu_dtype=mu_dtype,
                    weight_decay=c.weight_decay, mask=mask),
    )
