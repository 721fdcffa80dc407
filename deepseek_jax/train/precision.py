"""Which precision recipe a run's weight matmuls use: plain, or the FP8 recipe `config.fp8` names."""

from __future__ import annotations

import ml_collections

from deepseek_jax.ops.fp8 import make_recipe
from deepseek_jax.ops.recipe import Recipe


def recipe_for(config: ml_collections.ConfigDict) -> Recipe | None:
    """The FP8 recipe to inject into every eligible Linear and the routed experts, or None for plain matmuls."""
    if "fp8" not in config or not config.fp8.enabled:
        return None
    return make_recipe(config.fp8.recipe, tile=config.fp8.tile, grad_dtype=config.fp8.grad_dtype)
