"""Building blocks shared by every module: RMSNorm, Linear, the SwiGLU MLP.

Legend: D input features, F output features (or FFN width).

Params are float32 and carry logical axis names (mapped to mesh axes by `parallel/mesh.py`); compute
runs in `ModelConfig.dtype`. `Linear` is the one place a dense matmul with a weight happens, so the FP8
recipe (ops/recipe.py) is injected there (and into the routed experts' grouped GEMMs, model/experts.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.model import remat
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.ops.recipe import Recipe


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def default_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    return jnp.matmul(x, w.astype(x.dtype))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32. x [..., D] -> [..., D]."""

    eps: float
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = scale.reshape((1,) * (x.ndim - 1) + scale.shape)
        return checkpoint_name((normed * scale).astype(x.dtype), remat.RMSNORM)


class Linear(nn.Module):
    """x [..., D] @ kernel [D, F] -> [..., F] (no bias), as one [N, D] @ [D, F] product over the N tokens of
    the leading dims. `axes` names the kernel's two dims.

    `high_precision=True` marks the layers DeepSeek-V3 keeps out of FP8 (output head, router); they
    always use the plain matmul in the compute dtype (the router additionally runs in float32 itself).
    """

    features: int
    axes: tuple[str | None, str | None]
    dtype: jnp.dtype = jnp.float32
    high_precision: bool = False
    recipe: Recipe | None = None  # Injected FP8 recipe; None = plain matmul.
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    checkpoint_as: str = remat.LINEAR  # Name of the output for the recomputation policy.

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        # One token dim: with two ([B, T, D]) the weight gradient contracts over both, and XLA:CPU writes
        # its other operand out transposed, fused with the elementwise work producing it, one strided
        # element at a time (tiny's dense MLP: 17 ms of a 0.42 s step, for a 4 MB array).
        tokens = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        if self.recipe is not None and not self.high_precision:
            y = self.recipe.matmul(x, kernel.astype(self.dtype)).astype(self.dtype)
        else:
            y = default_matmul(x, kernel)
        return checkpoint_name(y.reshape(*tokens, self.features), self.checkpoint_as)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). x [..., D] -> [..., D]."""

    cfg: ModelConfig
    intermediate_size: int
    recipe: Recipe | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dtype = compute_dtype(self.cfg)
        hidden, width = x.shape[-1], self.intermediate_size
        gate = Linear(width, ("embed", "mlp"), dtype, recipe=self.recipe, name="gate_proj")(x)
        up = Linear(width, ("embed", "mlp"), dtype, recipe=self.recipe, name="up_proj")(x)
        return Linear(hidden, ("mlp", "embed"), dtype, recipe=self.recipe, name="down_proj")(
            nn.silu(gate) * up)
