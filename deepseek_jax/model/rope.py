"""Rotary position embedding with YaRN context extension, in DeepSeek's interleaved-pair layout.

Legend: B batch, T time, H heads, R rope width (qk_rope_head_dim).

DeepSeek's released weights rotate channel pairs (2j, 2j+1) by the angle `position * inv_freq[j]` (its
inference code views the rope channels as complex numbers). We apply that rotation directly to the raw
weights' layout, so imported checkpoints need no column permutation.

YaRN (Peng et al., 2023) interpolates the low frequencies by `factor`, keeps the high ones, and ramps
linearly in between; the attention logits are then rescaled by `yarn_mscale` (see `softmax_scale`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    """The rope channel index whose wavelength fits `num_rotations` times into `max_position`."""
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inverse_frequencies(dim: int, base: float, rope_scaling: Mapping[str, Any] | None) -> np.ndarray:
    """Per-pair rotation speeds, float64 [R/2]; YaRN-blended when `rope_scaling` is given."""
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rope_scaling is None:
        return inv_freq
    factor = float(rope_scaling["factor"])
    original = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast", 32))
    beta_slow = float(rope_scaling.get("beta_slow", 1))
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001  # Avoid a zero-width ramp.
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 on fast (high-frequency) pairs, which YaRN leaves alone.
    return inv_freq / factor * (1.0 - keep) + inv_freq * keep


def rotation_magnitude(rope_scaling: Mapping[str, Any] | None) -> float:
    """Scale folded into cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    if rope_scaling is None:
        return 1.0
    factor = float(rope_scaling["factor"])
    return yarn_mscale(factor, float(rope_scaling.get("mscale", 1.0))) / yarn_mscale(
        factor, float(rope_scaling.get("mscale_all_dim", 0.0)))


def softmax_scale(qk_head_dim: int, rope_scaling: Mapping[str, Any] | None) -> float:
    """Attention logit scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim ** -0.5
    if rope_scaling is not None and rope_scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


def cos_sin(positions_BT: jnp.ndarray, dim: int, base: float,
            rope_scaling: Mapping[str, Any] | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of every pair's angle, float32 [B, T, R/2]."""
    inv_freq = jnp.asarray(inverse_frequencies(dim, base, rope_scaling), jnp.float32)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    magnitude = rotation_magnitude(rope_scaling)
    return jnp.cos(angles) * magnitude, jnp.sin(angles) * magnitude


def apply_rotary(x_BTHR: jnp.ndarray, cos_BTP: jnp.ndarray, sin_BTP: jnp.ndarray) -> jnp.ndarray:
    """Rotates interleaved channel pairs (2j, 2j+1) of x [B, T, H, R] by per-position angles [B, T, R/2].

    Computed in float32 and returned in x's dtype.
    """
    x = x_BTHR.astype(jnp.float32)
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_BTP[:, :, None, :], sin_BTP[:, :, None, :]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x_BTHR.dtype)


def apply_rotary_half_split(x_BTHR: jnp.ndarray, cos_BTP: jnp.ndarray, sin_BTP: jnp.ndarray) -> jnp.ndarray:
    """`apply_rotary` for channels stored half-split: channel j pairs with j + R/2 (the rotate-half layout of
    DeepSeek-V3.2's lightning indexer in transformers, model/indexer.py). Float32 inside, x's dtype out."""
    x = x_BTHR.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    cos, sin = cos_BTP[:, :, None, :], sin_BTP[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BTHR.dtype)
