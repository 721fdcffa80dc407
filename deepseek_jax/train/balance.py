"""Auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2; Wang et al., 2024) and MaxVio.

After each step, every MoE layer's selection bias moves by gamma against its expert's load:
    b_i <- b_i + gamma * sign(mean load - load_i)
(overloaded experts get less likely to be chosen, underloaded ones more). The bias only changes which
experts are selected, never the gating weights (model/moe.py), and it receives no gradient.

Legend: L layers, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _counts_for(router_stats: dict, name: str) -> jnp.ndarray:
    return router_stats[name]["expert_counts"]


def update_biases(routing: dict, router_stats: dict, gamma: float | jnp.ndarray) -> dict:
    """New routing biases. `routing[name]` holds one bias leaf shaped like stats[name]['expert_counts']
    ([L, E] for a stack of layers, [E] for an MTP block)."""
    def update(name: str, subtree):
        counts = _counts_for(router_stats, name)
        delta = gamma * jnp.sign(counts.mean(axis=-1, keepdims=True) - counts)
        return jax.tree.map(lambda bias: bias + delta.astype(bias.dtype), subtree)
    return {name: update(name, subtree) for name, subtree in routing.items()}


def max_violation(counts_LE: jnp.ndarray) -> jnp.ndarray:
    """MaxVio per layer: max load / mean load - 1 ([..., E] -> [...]); 0 when perfectly balanced."""
    mean = counts_LE.mean(axis=-1)
    return jnp.where(mean > 0, counts_LE.max(axis=-1) / jnp.maximum(mean, 1e-9) - 1.0, 0.0)


def moe_stats(router_stats: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(MaxVio of every MoE layer [n], balance loss of every MoE layer [n]), in layer order, MTP last.

    The entries with expert counts are the MoE stacks and MTP blocks (model/transformer.py); a dense stack
    reports at most its indexers' loss (sparse attention).
    """
    moe = [n for n in router_stats if "expert_counts" in router_stats[n]]
    if not moe:
        return jnp.zeros((0,)), jnp.zeros((0,))
    vio = [jnp.atleast_1d(max_violation(_counts_for(router_stats, n))) for n in moe]
    loss = [jnp.atleast_1d(router_stats[n]["balance_loss"]) for n in moe]
    return jnp.concatenate(vio), jnp.concatenate(loss)
