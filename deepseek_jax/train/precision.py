"""Which matmul a run's Linears use: plain, or the FP8 recipe `config.fp8` names."""

from __future__ import annotations

import ml_collections

from deepseek_jax.model.layers import Matmul


def matmul_for(config: ml_collections.ConfigDict) -> Matmul | None:
    """The FP8 recipe to inject into every eligible Linear, or None for plain matmuls."""
    if "fp8" not in config or not config.fp8.enabled:
        return None
    from deepseek_jax.ops.fp8 import make_recipe  # Local: runs without FP8 never import it.

    return make_recipe(config.fp8.recipe, tile=config.fp8.tile, grad_dtype=config.fp8.grad_dtype)
