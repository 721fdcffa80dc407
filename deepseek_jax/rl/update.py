"""Scoring completions with a model forward, and the GRPO update step on the trainer's TrainState.

Legend: N completions, W sequence width, V vocabulary.

The old and reference log-probs are computed by `score` once per batch of rollouts; the update
recomputes the policy's with the same `logprobs_from_logits` under the gradient. Log-probs are those of the
distribution the tokens were sampled from: logits / temperature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from deepseek_jax import model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.rl import objective
from deepseek_jax.rl.objective import LossSettings
from deepseek_jax.train import step as step_lib


def logprobs_from_logits(logits_NWV: jnp.ndarray, tokens_NW: jnp.ndarray, temperature: float
                         ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(log pi(tokens[:, t+1] | tokens[:, :t+1]) [N, W-1], entropy of that distribution [N, W-1])."""
    logp_all = jax.nn.log_softmax(logits_NWV[:, :-1] / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens_NW[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def forward(cfg: ModelConfig, variables: dict, batch: dict):
    """The model on a batch of sequences (each from position 0; padding is segment 0)."""
    return model.apply(cfg, variables, batch["tokens"], segment_ids_BT=batch["segment_ids"], run_mtp=False)


def score(variables: dict, batch: dict, *, cfg: ModelConfig, temperature: float) -> jnp.ndarray:
    """log-probs [N, W-1] of a batch's tokens (for the old and the reference policy; jit with cfg bound)."""
    return logprobs_from_logits(forward(cfg, variables, batch).logits, batch["tokens"], temperature)[0]


def policy_loss(logits_NWV: jnp.ndarray, batch: dict, settings: LossSettings, temperature: float
                ) -> tuple[jnp.ndarray, dict]:
    """(loss, metrics) of the policy whose logits these are. batch: tokens, mask, advantages, and
    old_logp / ref_logp when present (see objective.grpo_loss)."""
    logp, entropy = logprobs_from_logits(logits_NWV, batch["tokens"], temperature)
    loss, metrics = objective.grpo_loss(logp, batch["advantages"], batch["mask"], settings, batch.get("old_logp"),
                                        batch.get("ref_logp"))
    mask = batch["mask"]
    metrics["entropy"] = jax.lax.stop_gradient(jnp.sum(entropy * mask) / jnp.maximum(mask.sum(), 1.0))
    metrics["loss"] = loss
    return loss, metrics


def with_idle_modules(routing: dict, router_stats: dict) -> dict:
    """Router stats plus zero loads for the MoE modules the pass did not run (the MTP modules: only the
    main head is scored), so the balancing update leaves their biases as they are."""
    idle = {name: {"expert_counts": jnp.zeros_like(jax.tree.leaves(subtree)[0])}
            for name, subtree in routing.items() if name not in router_stats}
    return {**router_stats, **idle}


def loss_fn(params, routing, batch: dict, *, cfg: ModelConfig, settings: LossSettings, temperature: float):
    """(loss, (metrics, router stats)) of the policy with these params."""
    out = forward(cfg, {"params": params, "routing": routing}, batch)
    loss, metrics = policy_loss(out.logits, batch, settings, temperature)
    return loss, (metrics, with_idle_modules(routing, out.router_stats))


def grpo_step(state: step_lib.TrainState, batch: dict, *, cfg: ModelConfig, settings: LossSettings,
              temperature: float, train_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation
              ) -> tuple[step_lib.TrainState, dict]:
    """One optimizer update on a batch of rollouts (AdamW, NaN guard, routing-bias update as in training)."""
    grads, (metrics, router_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.routing, batch, cfg=cfg, settings=settings, temperature=temperature)
    return step_lib.apply_update(state, grads, metrics, router_stats, train_cfg, tx)
