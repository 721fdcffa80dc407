"""The pure training step: loss, gradients, AdamW, NaN guard, loss-free bias update.

Legend: B batch, T time.

    loss = CE(main) + lambda(step) * mean_k CE(MTP_k) + alpha * mean over MoE layers of the
           sequence-wise balance loss                                        (train/losses.py)
           [+ w * mean over layers of the lightning indexer's KL, for sparse attention (V3.2)]

A step whose loss or gradient norm is not finite changes nothing (params, optimizer state, biases),
is counted in `bad_steps`, and the run loop stops after `max_bad_steps` in a row.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from deepseek_jax import model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.ops.recipe import Recipe
from deepseek_jax.parallel import dispatch
from deepseek_jax.train import balance, losses
from deepseek_jax.train.optimizer import frozen_outside_indexer, trains_indexer_only

Batch = dict[str, jnp.ndarray]  # tokens, segment_ids, positions: int32 [B, T]


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: updates applied or skipped so far.
    params: Any
    opt_state: Any
    routing: Any  # Loss-free balancing biases (state, not trained).
    bad_steps: jnp.ndarray  # int32: consecutive non-finite steps.
    skipped_steps: jnp.ndarray  # int32: non-finite steps in total.


def state_from_variables(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 with these variables {'params', 'routing'} and a fresh optimizer state."""
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    return TrainState(step=zero(), params=variables["params"], opt_state=jax.jit(tx.init)(variables["params"]),
                      routing=variables["routing"], bad_steps=zero(), skipped_steps=zero())


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return state_from_variables(model.init(cfg, key), tx)


def mtp_weight(train_cfg: ml_collections.ConfigDict, step: jnp.ndarray) -> jnp.ndarray:
    """lambda: `mtp_lambda` until `mtp_lambda_switch` x steps, then `mtp_lambda_late` (V3: 0.3 -> 0.1)."""
    switch = int(train_cfg.mtp_lambda_switch * train_cfg.steps)
    return jnp.where(step < switch, train_cfg.mtp_lambda, train_cfg.mtp_lambda_late)


def loss_and_metrics(params, routing, batch: Batch, step: jnp.ndarray, cfg: ModelConfig,
                     train_cfg: ml_collections.ConfigDict, recipe: Recipe | None = None):
    """(total loss, (metrics, router stats)) for one batch."""
    out = model.apply(cfg, {"params": params, "routing": routing}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], recipe=recipe, dispatch=dispatch.implementation(cfg))
    terms = losses.loss_terms(out.logits, out.mtp_logits, batch["tokens"], batch["segment_ids"])
    total = losses.language_loss(terms, mtp_weight(train_cfg, step))
    _, balance_losses = balance.moe_stats(out.router_stats)
    if balance_losses.size:
        total = total + losses.balance_term(balance_losses, train_cfg.balance_alpha)
    indexer_kl = losses.indexer_loss(out.router_stats)
    if indexer_kl is not None:
        total = total + train_cfg.get("indexer_loss_weight", 1.0) * indexer_kl
    return total, (losses.step_metrics(terms, out.router_stats, total, cfg), out.router_stats)


def train_step(state: TrainState, batch: Batch, *, cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, recipe: Recipe | None = None) -> tuple[TrainState, dict]:
    """One update. Pure; jit it with the keyword arguments bound (see train/pretrain.py)."""
    grad_fn = jax.grad(loss_and_metrics, has_aux=True)
    grads, (metrics, router_stats) = grad_fn(state.params, state.routing, batch, state.step, cfg, train_cfg,
                                             recipe)
    grads = frozen_outside_indexer(grads, train_cfg)
    return apply_update(state, grads, metrics, router_stats, train_cfg, tx)


def apply_update(state: TrainState, grads, metrics: dict, router_stats: dict,
                 train_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation
                 ) -> tuple[TrainState, dict]:
    """The update half of a step, shared by every way of computing gradients (e.g. pipelined):
    AdamW, the loss-free bias update, and the NaN guard that keeps the old state."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The dense warm-up freezes the model, its balancing biases included.
    gamma = 0.0 if trains_indexer_only(train_cfg) else train_cfg.bias_update_speed
    routing = balance.update_biases(state.routing, router_stats, gamma)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    bad = jnp.where(finite, 0, state.bad_steps + 1)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        routing=keep(routing, state.routing), bad_steps=bad,
        skipped_steps=state.skipped_steps + (1 - finite.astype(jnp.int32)))
    metrics.update(grad_norm=grad_norm, finite=finite, bad_steps=bad)
    return new_state, metrics


def eval_step(params, routing, batch: Batch, *, cfg: ModelConfig, recipe: Recipe | None = None) -> dict:
    """Summed next-token loss (nats) and token count of one batch, for bits per byte."""
    out = model.apply(cfg, {"params": params, "routing": routing}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], recipe=recipe, run_mtp=False, dispatch=dispatch.implementation(cfg))
    nll, count = losses.next_token_loss(out.logits, batch["tokens"], batch["segment_ids"])
    return {"nll": nll, "tokens": count}
