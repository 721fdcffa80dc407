"""The GRPO objective (DeepSeekMath eq. 3; DeepSeek-V3 section 5.2.2) and its DAPO / Dr. GRPO variants.

Legend: N completions (= prompts x G), G group size, T token positions.

Token arrays [N, T] are aligned to the tokens they score: logp[n, t] is log pi(o_{n,t} | q, o_{n,<t})
for whatever token sits at t, and mask[n, t] = 1 exactly where that token belongs to the completion
(padding and the prompt are 0). Per token, with rho = pi / pi_old and A_n the completion's advantage:

    l_{n,t} = -min(rho A_n, clip(rho, 1 - eps_low, 1 + eps_high) A_n) + beta k3_{n,t},
    k3      = pi_ref / pi - log(pi_ref / pi) - 1          (unbiased, >= 0; Schulman's k3)

and the loss aggregates l over the completion tokens:

    'grpo'    (1/N) sum_n (1/|o_n|) sum_t l     mean per sequence, then per group (groups are equal-sized,
                                               so the mean over groups of group means is this mean)
    'dapo'    sum_{n,t} l / sum_n |o_n|          token level: long completions weigh by their length
    'dr_grpo' sum_{n,t} l / (N L)                a constant L (the generation budget) instead of |o_n|

Advantages are group-normalised, A_n = (r_n - mean_g r) / (std_g r + eps) (sample std, ddof 1), except
for 'dr_grpo', which drops the std (A_n = r_n - mean_g r). A group whose rewards are all equal has
A = 0 exactly: it contributes nothing but the KL term.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static choices of the objective (hashable: part of the jitted step's cache key)."""

    loss_type: str = "grpo"  # One of LOSS_TYPES.
    clip_low: float = 0.2  # eps_low: rho is clipped below at 1 - clip_low ...
    clip_high: float = 0.2  # ... and above at 1 + clip_high (DAPO's "clip higher": 0.28).
    kl_beta: float = 0.04  # beta; 0 = no KL term (and no reference model).
    max_completion_tokens: int = 0  # L, the constant normaliser of 'dr_grpo'.
    adv_eps: float = 1e-4  # eps in the advantage's denominator.

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"config.rl.loss_type={self.loss_type!r} is invalid: use one of {LOSS_TYPES}.")
        if self.loss_type == "dr_grpo" and self.max_completion_tokens < 1:
            raise ValueError("loss_type 'dr_grpo' normalises by the generation budget: set "
                             "max_completion_tokens (config.rl.max_new_tokens) >= 1.")

    @property
    def scale_by_std(self) -> bool:
        return self.loss_type != "dr_grpo"


def group_advantages(rewards_N: jnp.ndarray, group_size: int, settings: LossSettings) -> jnp.ndarray:
    """A [N] float32 from rewards [N] ordered group by group (completions n*G .. n*G+G-1 share a prompt)."""
    r = jnp.asarray(rewards_N, jnp.float32).reshape(-1, group_size)
    centered = r - r.mean(axis=1, keepdims=True)
    if settings.scale_by_std:
        centered = centered / (r.std(axis=1, ddof=1, keepdims=True) + settings.adv_eps)
    same = (r.max(axis=1) == r.min(axis=1))[:, None]  # Exactly 0, not rounding noise / eps.
    return jnp.where(same, 0.0, centered).reshape(-1)


def k3(logp: jnp.ndarray, ref_logp: jnp.ndarray) -> jnp.ndarray:
    """The k3 estimate of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = log pi_ref - log pi."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def aggregate(values_NT: jnp.ndarray, mask_NT: jnp.ndarray, settings: LossSettings) -> jnp.ndarray:
    """Per-token values [N, T] -> the scalar the loss type defines (see the module docstring)."""
    summed_N = jnp.sum(values_NT * mask_NT, axis=1)
    if settings.loss_type == "grpo":
        return jnp.mean(summed_N / jnp.maximum(mask_NT.sum(axis=1), 1.0))
    if settings.loss_type == "dapo":
        return summed_N.sum() / jnp.maximum(mask_NT.sum(), 1.0)
    return summed_N.sum() / (values_NT.shape[0] * settings.max_completion_tokens)


def grpo_loss(logp_NT: jnp.ndarray, advantages_N: jnp.ndarray, mask_NT: jnp.ndarray, settings: LossSettings,
              old_logp_NT: jnp.ndarray | None = None, ref_logp_NT: jnp.ndarray | None = None
              ) -> tuple[jnp.ndarray, dict]:
    """(loss, metrics) for the current policy's log-probs.

    old_logp None means the policy *is* the old policy (the first of the updates on a batch, or
    mu = 1): rho = 1 with the gradient of log pi. ref_logp is needed iff kl_beta > 0.
    Metrics (means over completion tokens): clip_fraction (tokens where the clipped branch is the
    minimum, so they get no gradient), kl (k3; only with a reference), ratio.
    """
    if settings.kl_beta > 0 and ref_logp_NT is None:
        raise ValueError("kl_beta > 0 needs the reference policy's log-probs (ref_logp).")
    mask = mask_NT.astype(jnp.float32)
    old = jax.lax.stop_gradient(logp_NT) if old_logp_NT is None else old_logp_NT
    ratio = jnp.exp(logp_NT - old)
    adv = advantages_N[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - settings.clip_low, 1.0 + settings.clip_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    tokens = jnp.maximum(mask.sum(), 1.0)
    metrics = {"clip_fraction": jnp.sum((clipped < unclipped) * mask) / tokens,
               "ratio": jnp.sum(ratio * mask) / tokens}
    if ref_logp_NT is not None:
        kl = k3(logp_NT, ref_logp_NT)
        metrics["kl"] = jnp.sum(kl * mask) / tokens
        if settings.kl_beta > 0:
            per_token = per_token + settings.kl_beta * kl
    return aggregate(per_token, mask, settings), metrics
