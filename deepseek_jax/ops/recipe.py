"""The precision recipe a model's weight matmuls run with: one protocol for every FP8 recipe.

Legend: N rows (all leading dims of x flattened), K input features, M output features, G groups (experts).

`model/` receives a recipe (or None: plain matmuls in the compute dtype) and calls it in exactly two
places: every eligible `Linear` (`matmul`) and the routed experts' grouped GEMMs (`grouped`,
`routed_grouped`). `ops/fp8.py` implements it twice: DeepSeek-V3's fine-grained tiles and blocks
(`Fp8Recipe`) and the per-tensor baseline (`PerTensorFp8Recipe`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import jax

Array = jax.Array
# route(a [n, C], *route_args) -> [M, C]: moves whole rows (each output row is one input row or zeros).
Route = Callable[..., Array]


@runtime_checkable
class Recipe(Protocol):
    """How the weight matmuls are computed (in FP8 with their own backward, for the recipes here)."""

    def matmul(self, x: Array, w: Array) -> Array:
        """x [..., K] @ w [K, M] -> [..., M] in x's dtype."""

    def grouped(self, x: Array, w: Array, group_sizes: Array) -> Array:
        """`lax.ragged_dot(x [N, K], w [G, K, M], group_sizes [G])` -> [N, M]: rows sorted by group."""

    def routed_grouped(self, x: Array, ws: tuple[Array, ...], group_sizes: Array, route: Route,
                       route_args: tuple[Array, ...]) -> tuple[Array, ...]:
        """`grouped(route(x, *route_args), w, group_sizes)` for each w of `ws` (the experts' gate and up
        projections share their input rows), the rows moved by `route` in whatever form the recipe
        wants them to travel (the fine-grained recipe quantises first: the FP8 dispatch)."""


def check_recipe(recipe: object, where: str) -> None:
    """Raises ValueError unless `recipe` is None or implements `Recipe`."""
    if recipe is not None and not isinstance(recipe, Recipe):
        raise ValueError(f"{where} got recipe={recipe!r}, which is not an ops.recipe.Recipe (it needs `matmul`, "
                         "and the routed experts' grouped GEMMs `grouped` and `routed_grouped`: a plain matmul "
                         "function has no grouped GEMMs): pass an ops.fp8 recipe, or None")
