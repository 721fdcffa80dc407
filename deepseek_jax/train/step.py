"""The pure training step: loss, gradients, AdamW, NaN guard, loss-free bias update.

Legend: B batch, T time.

    loss = CE(main) + lambda(step) * mean_k CE(MTP_k) + alpha * mean over MoE layers of the
           sequence-wise balance loss

A step whose loss or gradient norm is not finite changes nothing (params, optimizer state, biases),
is counted in `bad_steps`, and the loop stops after `max_bad_steps` in a row.
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
from deepseek_jax.model.layers import Matmul
from deepseek_jax.train import balance, losses

Batch = dict[str, jnp.ndarray]  # tokens, segment_ids, positions: int32 [B, T]


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: updates applied or skipped so far.
    params: Any
    opt_state: Any
    routing: Any  # Loss-free balancing biases (state, not trained).
    bad_steps: jnp.ndarray  # int32: consecutive non-finite steps.
    skipped_steps: jnp.ndarray  # int32: non-finite steps in total.


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    variables = model.init(cfg, key)
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    return TrainState(step=zero(), params=variables["params"], opt_state=jax.jit(tx.init)(variables["params"]),
                      routing=variables["routing"], bad_steps=zero(), skipped_steps=zero())


def mtp_weight(train_cfg: ml_collections.ConfigDict, step: jnp.ndarray) -> jnp.ndarray:
    """lambda: `mtp_lambda` until `mtp_lambda_switch` x steps, then `mtp_lambda_late` (V3: 0.3 -> 0.1)."""
    switch = int(train_cfg.mtp_lambda_switch * train_cfg.steps)
    return jnp.where(step < switch, train_cfg.mtp_lambda, train_cfg.mtp_lambda_late)


def loss_and_metrics(params, routing, batch: Batch, step: jnp.ndarray, cfg: ModelConfig,
                     train_cfg: ml_collections.ConfigDict, matmul: Matmul | None = None):
    """(total loss, (metrics, router stats)) for one batch."""
    out = model.apply(cfg, {"params": params, "routing": routing}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], matmul=matmul)
    main_sum, main_count = losses.next_token_loss(out.logits, batch["tokens"], batch["segment_ids"])
    main = main_sum / jnp.maximum(main_count, 1.0)
    total = main
    metrics = {"main_loss": main, "tokens": main_count}
    if out.mtp_logits is not None:
        sums, counts = losses.mtp_losses(out.mtp_logits, batch["tokens"], batch["segment_ids"])
        mtp = jnp.mean(sums / jnp.maximum(counts, 1.0))
        total = total + mtp_weight(train_cfg, step) * mtp
        metrics["mtp_loss"] = mtp
    max_vio, balance_losses = balance.moe_stats(routing, out.router_stats)
    if balance_losses.size:
        balance_loss = balance_losses.mean()
        total = total + train_cfg.balance_alpha * balance_loss
        metrics.update(balance_loss=balance_loss, max_vio=max_vio.mean(), max_vio_per_layer=max_vio)
    if cfg.moe_capacity_factor:
        metrics["dropped_pairs"] = sum(s["dropped"].sum() for s in out.router_stats.values() if "dropped" in s)
    metrics["loss"] = total
    return total, (metrics, out.router_stats)


def train_step(state: TrainState, batch: Batch, *, cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, matmul: Matmul | None = None) -> tuple[TrainState, dict]:
    """One update. Pure; jit it with the keyword arguments bound (see train/loop.py)."""
    grad_fn = jax.grad(loss_and_metrics, has_aux=True)
    grads, (metrics, router_stats) = grad_fn(state.params, state.routing, batch, state.step, cfg, train_cfg,
                                             matmul)
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
    routing = balance.update_biases(state.routing, router_stats, train_cfg.bias_update_speed)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    bad = jnp.where(finite, 0, state.bad_steps + 1)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        routing=keep(routing, state.routing), bad_steps=bad,
        skipped_steps=state.skipped_steps + (1 - finite.astype(jnp.int32)))
    metrics.update(grad_norm=grad_norm, finite=finite, bad_steps=bad)
    return new_state, metrics


def eval_step(params, routing, batch: Batch, *, cfg: ModelConfig, matmul: Matmul | None = None) -> dict:
    """Summed next-token loss (nats) and token count of one batch, for bits per byte."""
    out = model.apply(cfg, {"params": params, "routing": routing}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], matmul=matmul, run_mtp=False)
    nll, count = losses.next_token_loss(out.logits, batch["tokens"], batch["segment_ids"])
    return {"nll": nll, "tokens": count}
