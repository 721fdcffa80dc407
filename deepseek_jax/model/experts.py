"""Routed experts and their dispatch strategies.

Legend: N tokens, D model, F expert FFN width (moe_intermediate_size), E experts, K experts per token,
M = N*K routed (token, expert) pairs.

Every strategy computes y_n = sum_k w_{n,k} * SwiGLU_{e_{n,k}}(x_n) exactly (no capacity, no drops):
- `dense`: every expert on every token, then a weighted combine. O(N*E) work; the reference.
- `ragged`: sort the M pairs by expert, run each expert on its contiguous rows as a grouped GEMM,
  scatter back. O(N*K) work. The grouped GEMM is `jax.lax.ragged_dot` where it lowers to grouped-GEMM
  kernels (GPU, TPU); XLA:CPU lowers ragged_dot to a product of every row with every expert, masked
  (E times the work), so on CPU each expert's rows are padded to whole blocks of b rows and the blocks
  run as one batched GEMM against their expert's weights (`blocked_swiglu`: at most E*(b-1) extra rows).
- `gather`: each token gathers its K experts' weights and multiplies them directly. O(N*K) work and
  weight reads: the decoding strategy (infer/ uses it when N*K <= E).
- `ep`: expert parallelism, the experts split over devices and the tokens moved to them. It needs a mesh
  and collectives, so model/ does not implement it: the caller injects it as a `Dispatch`
  (parallel/expert_parallel.py's `ExpertParallel`), as it injects the FP8 recipe.

FP8 (a recipe with grouped GEMMs, ops/fp8.py): `ragged` and `ep` run the experts' three GEMMs in FP8
(ops/fp8_grouped.py); the tokens are quantised once, before they are gathered (or sent), and the
gate and up projections read those FP8 rows. `dense` stays the high-precision reference and `gather`
(decoding: no backward, weight reads dominate) stays high precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.model import remat
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import compute_dtype
from deepseek_jax.ops.recipe import Recipe, Route, check_recipe

ExpertWeights = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]  # gate [E,D,F], up [E,D,F], down [E,F,D]


class Dispatch(Protocol):
    """An expert dispatch the caller injects (`moe_dispatch='ep'`): the routed experts' output and the
    (token, expert) pairs it dropped, of tokens x [N, D] routed with weights, indices [N, K] (global
    expert ids), with the expert weights the module holds: `experts_held(E)` of the E experts (all of
    them, or a device's slice when the caller already runs per device)."""

    def experts_held(self, num_experts: int) -> int: ...

    def __call__(self, x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray, w: ExpertWeights,
                 recipe: Recipe | None) -> tuple[jnp.ndarray, jnp.ndarray]: ...


def dense_dispatch(x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray,
                   w: ExpertWeights) -> jnp.ndarray:
    """Reference: all experts on all tokens. Returns [N, D] in x's dtype."""
    gate, up, down = w
    E = gate.shape[0]
    combine_NE = jnp.einsum("NK,NKE->NE", weights_NK, jax.nn.one_hot(indices_NK, E, dtype=weights_NK.dtype))
    gate_NEF = checkpoint_name(jnp.einsum("ND,EDF->NEF", x_ND, gate), remat.EXPERTS)
    up_NEF = checkpoint_name(jnp.einsum("ND,EDF->NEF", x_ND, up), remat.EXPERTS)
    out_NED = checkpoint_name(jnp.einsum("NEF,EFD->NED", nn.silu(gate_NEF) * up_NEF, down), remat.EXPERTS)
    return jnp.einsum("NE,NED->ND", combine_NE.astype(out_NED.dtype), out_NED).astype(x_ND.dtype)


def sort_by_expert(indices_NK: jnp.ndarray, num_experts: int
                   ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Orders the M = N*K pairs by expert (stable). Returns (order [M], token of each sorted pair [M],
    group sizes [E] int32)."""
    flat = indices_NK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // indices_NK.shape[1]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, token, sizes


def unsort_rows(sorted_MC: jnp.ndarray, order_M: jnp.ndarray) -> jnp.ndarray:
    """Rows sorted by the permutation `order` [M] back in their original order: out[order[i]] = sorted[i].
    [M, C] -> [M, C]. A scatter told its indices are unique (they are a permutation): otherwise its
    derivative scatters and gathers back row ids [M, C] to find which duplicate won (XLA's profile of
    tiny's train step: about 6 ms of 0.4 s)."""
    return jnp.zeros_like(sorted_MC).at[order_M].set(sorted_MC, unique_indices=True)


def block_rows(num_rows: int, num_experts: int) -> int:
    """b, the rows of one block of `blocked_swiglu`: the largest power of two in [16, 256] at most half
    an even expert's share of `num_rows` (measured fastest on this CPU for the tiny and small configs;
    smaller blocks waste less padding but gather more weight copies)."""
    share = max(num_rows // (2 * num_experts), 1)
    return min(max(1 << (share.bit_length() - 1), 16), 256)


def num_blocks(num_rows: int, num_experts: int, b: int) -> int:
    """How many blocks of b rows `blocked_swiglu` allots: every expert's rows padded to whole blocks fit in
    sum_e ceil(s_e / b) <= sum_e (s_e + b - 1) / b <= (M + E (b - 1)) / b, an integer, so its floor (one
    block fewer than ceil(M/b) + E whenever E < b)."""
    return (num_rows + num_experts * (b - 1)) // b


def blocked_swiglu(x_MD: jnp.ndarray, sizes_E: jnp.ndarray, w: ExpertWeights) -> jnp.ndarray:
    """SwiGLU of the E experts on rows x [M, D] sorted by expert, sizes_E rows each (rows past the groups
    give zeros), as batched GEMMs over blocks: each expert's rows padded to a multiple of b rows, every
    block multiplied by its expert's weights (gathered per block). NB = `num_blocks` blocks bound any
    sizes. Returns [M, D]."""
    gate, up, down = w
    (M, D), E = x_MD.shape, sizes_E.shape[0]
    b = block_rows(M, E)
    NB = num_blocks(M, E, b)
    padded_E = (sizes_E + b - 1) // b * b
    padded_end_E = jnp.cumsum(padded_E)
    padded_start_E, start_E = padded_end_E - padded_E, jnp.cumsum(sizes_E) - sizes_E
    # A block's expert: how many experts' padded rows end at or before its first row (searchsorted,
    # written as a count: jnp.searchsorted fails inside a shard_map with manual axes in jax 0.10).
    first_row_NB = jnp.arange(NB) * b
    expert_NB = jnp.minimum(jnp.sum(padded_end_E[None, :] <= first_row_NB[:, None], axis=1), E - 1)
    expert_R = jnp.repeat(expert_NB, b, total_repeat_length=NB * b)
    offset_R = jnp.arange(NB * b) - padded_start_E[expert_R]
    source_R = jnp.where(offset_R < sizes_E[expert_R], start_E[expert_R] + offset_R, M)  # M: a zero row
    x_NBbD = jnp.take(x_MD, source_R, axis=0, mode="fill", fill_value=0).reshape(NB, b, D)
    gate_NBbF = checkpoint_name(jnp.einsum("nbD,nDF->nbF", x_NBbD, gate[expert_NB]), remat.EXPERTS)
    up_NBbF = checkpoint_name(jnp.einsum("nbD,nDF->nbF", x_NBbD, up[expert_NB]), remat.EXPERTS)
    out_NBbD = checkpoint_name(jnp.einsum("nbF,nFD->nbD", nn.silu(gate_NBbF) * up_NBbF, down[expert_NB]),
                               remat.EXPERTS)
    row_M = jnp.arange(M)
    expert_M = jnp.repeat(jnp.arange(E), sizes_E, total_repeat_length=M)
    grouped_M = row_M < jnp.sum(sizes_E)
    target_M = jnp.where(grouped_M, padded_start_E[expert_M] + row_M - start_E[expert_M], NB * b)
    return jnp.take(out_NBbD.reshape(NB * b, D), target_M, axis=0, mode="fill", fill_value=0)


def grouped_swiglu(x_nD: jnp.ndarray, route: Route, route_args: tuple[jnp.ndarray, ...],
                   sizes_E: jnp.ndarray, w: ExpertWeights, recipe: Recipe | None) -> jnp.ndarray:
    """SwiGLU of the E experts on the rows route(x, *route_args) [M, D], sorted by expert with sizes_E
    rows each (rows past the groups give zeros). Grouped GEMMs (blocked on CPU, module docstring), in FP8
    when a recipe is given. Returns [M, D]."""
    gate, up, down = w
    if recipe is None:
        x_MD = route(x_nD, *route_args)
        if jax.default_backend() == "cpu":
            return blocked_swiglu(x_MD, sizes_E, w)
        gate_MF, up_MF = jax.lax.ragged_dot(x_MD, gate, sizes_E), jax.lax.ragged_dot(x_MD, up, sizes_E)
    else:
        gate_MF, up_MF = recipe.routed_grouped(x_nD, (gate, up), sizes_E, route, route_args)
    h_MF = nn.silu(checkpoint_name(gate_MF, remat.EXPERTS)) * checkpoint_name(up_MF, remat.EXPERTS)
    grouped = jax.lax.ragged_dot if recipe is None else recipe.grouped
    return checkpoint_name(grouped(h_MF, down, sizes_E), remat.EXPERTS)


def take_rows(a_n: jnp.ndarray, rows_M: jnp.ndarray) -> jnp.ndarray:
    """The route of the single-device dispatch: a [n, C] -> a[rows] [M, C]."""
    return a_n[rows_M]


def ragged_dispatch(x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray,
                    w: ExpertWeights, recipe: Recipe | None = None) -> jnp.ndarray:
    """Dropless grouped-GEMM dispatch. Returns [N, D] in x's dtype."""
    N, K = indices_NK.shape
    order, token, sizes = sort_by_expert(indices_NK, w[0].shape[0])
    out_MD = grouped_swiglu(x_ND, take_rows, (token,), sizes, w, recipe)
    unsorted = unsort_rows(out_MD, order).reshape(N, K, -1)
    return jnp.einsum("NK,NKD->ND", weights_NK.astype(unsorted.dtype), unsorted).astype(x_ND.dtype)


def gather_dispatch(x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray,
                    w: ExpertWeights) -> jnp.ndarray:
    """Each token gathers its K experts' weights: O(N*K*D*F) reads, no sort. For a few tokens at a time
    (decoding, N*K <= E), where touching every expert's weights is the cost. Returns [N, D] in x's dtype."""
    gate, up, down = w
    # (N, K) as the batch dimensions of every product: with x broadcast per pair the gathered [D, F]
    # blocks are multiplied where they lie (contracting x with "ND,NKDF" made XLA:CPU transpose them).
    x_NKD = jnp.broadcast_to(x_ND[:, None], indices_NK.shape + x_ND.shape[-1:])
    gate_NKF = jnp.einsum("NKD,NKDF->NKF", x_NKD, gate[indices_NK])
    up_NKF = jnp.einsum("NKD,NKDF->NKF", x_NKD, up[indices_NK])
    out_NKD = jnp.einsum("NKF,NKFD->NKD", nn.silu(gate_NKF) * up_NKF, down[indices_NK])
    return jnp.einsum("NK,NKD->ND", weights_NK.astype(out_NKD.dtype), out_NKD).astype(x_ND.dtype)


LOCAL_DISPATCH: dict[str, Callable[..., jnp.ndarray]] = {"dense": dense_dispatch, "ragged": ragged_dispatch,
                                                         "gather": gather_dispatch}


class RoutedExperts(nn.Module):
    """The E routed SwiGLU experts as stacked kernels; x [N, D] -> (y [N, D], dropped pairs: float32 scalar).

    Only an injected dispatch can drop (expert parallelism with a capacity factor). `recipe`: the FP8
    recipe (the one injected into the Linears); 'ragged' and 'ep' then run the expert GEMMs in FP8,
    'dense' and 'gather' ignore it (module docstring). `dispatch`: the implementation of 'ep'.
    Initialising never runs the injected dispatch (the variables are the same; init needs no mesh).
    """

    cfg: ModelConfig
    recipe: Recipe | None = None
    dispatch: Dispatch | None = None

    @nn.compact
    def __call__(self, x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        cfg = self.cfg
        D, F = x_ND.shape[-1], cfg.moe_intermediate_size
        injected = cfg.moe_dispatch == "ep" and not self.is_initializing()
        if injected and self.dispatch is None:
            raise ValueError("moe_dispatch='ep' runs the expert-parallel dispatch its caller injects "
                             "(parallel.expert_parallel.ExpertParallel, which train/ passes for you); none was "
                             "given: pass dispatch=..., or use a local moe_dispatch ('ragged', 'dense', 'gather')")
        E = self.dispatch.experts_held(cfg.n_routed_experts) if injected else cfg.n_routed_experts
        chex.assert_shape(x_ND, (None, D))
        chex.assert_equal_shape([weights_NK, indices_NK])
        check_recipe(self.recipe, "RoutedExperts")
        init = nn.initializers.normal(0.02)
        param = lambda name, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
        gate = param("gate_proj", (E, D, F), ("expert", "embed", "expert_mlp"))
        up = param("up_proj", (E, D, F), ("expert", "embed", "expert_mlp"))
        down = param("down_proj", (E, F, D), ("expert", "expert_mlp", "embed"))
        dtype = compute_dtype(cfg)
        w = (gate.astype(dtype), up.astype(dtype), down.astype(dtype))
        x = jnp.asarray(x_ND, dtype)
        dropped = jnp.zeros((), jnp.float32)
        if injected:
            return self.dispatch(x, weights_NK, indices_NK, w, self.recipe)
        if cfg.moe_dispatch in ("ragged", "ep"):  # 'ep' here only while initialising.
            return ragged_dispatch(x, weights_NK, indices_NK, w, self.recipe), dropped
        return LOCAL_DISPATCH[cfg.moe_dispatch](x, weights_NK, indices_NK, w), dropped
