"""Expert parallelism: the routed experts split over the mesh's 'expert' axis, tokens moved to them.

Legend: N global tokens, n tokens on one device, D model, F expert FFN width, E experts, E_l = E/ep experts
per device, K experts per token, ep devices along the expert axis, C rows one device may send to each
destination (the capacity), R = ep*C rows of a send or receive buffer, M = n*K routed pairs on one device,
p a destination device (ep of them).

Inside one `jax.shard_map`, tokens are sharded over the batch axes (default ('data', 'expert')) and the
expert weights over 'expert' (replicated over 'data'). Each device:

1. packs its M (token, expert) pairs into a send buffer [ep, C, D], one block per destination device
   (expert // E_l), in (token, k) order; a destination's pairs past the first C are dropped (they
   contribute 0 and are counted);
2. `all_to_all` over 'expert' delivers every block, with the experts' local ids;
3. sorts the received rows by local expert and runs its E_l SwiGLU experts as grouped GEMMs
   (`lax.ragged_dot`), empty slots last and outside every group;
4. `all_to_all` back, then combines y_n = sum_k w_{n,k} * out(n, k) over the kept pairs.

FP8 (a recipe): as in the report (section 3.3.3), each device quantises its tokens in 1 x 128 tiles
before step 1, steps 1-2 move the FP8 values and their float32 scales, and the gate and up projections
of step 3 consume those FP8 rows (their activation tiles; no dequantise/requantise). The combine
(step 4) and every backward all-to-all stay in the compute dtype. Step 3's GEMMs are FP8
(ops/fp8_grouped.py); the Wgrad token tiles are per local expert within one device's rows, so with
data parallelism they differ from a single-device run's (the expert's rows of each data shard are tiled
on their own; Fprop and Dgrad, row-wise, are identical).

With `capacity_factor=0` (the default) C = n*min(K, E_l), the most one destination can receive from n
tokens, so nothing is ever dropped and the result equals `dense_dispatch`. The buffers are padded to C
rows per destination because XLA:CPU has no `ragged_all_to_all`; on GPU/TPU that collective would send
only the occupied rows. That variant was not written or measured here.

`ExpertParallel` is this dispatch as the model receives it (model/experts.py's `Dispatch`, injected
for moe_dispatch='ep' by parallel/dispatch.py). experiments/ep_traffic.py counts what its all-to-alls
move, against an all-gather baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.model.experts import ExpertWeights, grouped_swiglu, unsort_rows
from deepseek_jax.ops.recipe import Recipe
from deepseek_jax.parallel.mesh import BATCH_AXES


def capacity(n: int, K: int, E_l: int, ep: int, capacity_factor: float) -> int:
    """Rows one device may send to one destination. 0 means dropless: n*min(K, E_l), the worst case
    (a token's K experts are distinct, so at most min(K, E_l) of its pairs go to one device).
    Otherwise ceil(factor * n*K/ep), at least 1; capped at the dropless bound, past which a larger
    buffer cannot keep anything more."""
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor must be >= 0 (0 = dropless), got {capacity_factor}")
    dropless = n * min(K, E_l)
    if capacity_factor == 0:
        return dropless
    return min(dropless, max(1, math.ceil(capacity_factor * n * K / ep)))


def _pack(indices_nK, E_l: int, ep: int, C: int):
    """Places each pair in its destination's block. Returns (slot of each pair [M] (R where dropped),
    local expert ids [R] with E_l in empty slots, dropped count)."""
    n, K = indices_nK.shape
    e_M = indices_nK.reshape(-1)
    dest_M = e_M // E_l
    onehot_Mp = jax.nn.one_hot(dest_M, ep, dtype=jnp.int32)
    # Rank of each pair among the earlier pairs with the same destination: first come, first kept.
    pos_M = jnp.sum(jnp.cumsum(onehot_Mp, axis=0) * onehot_Mp, axis=-1) - 1
    kept_M = pos_M < C
    slot_M = jnp.where(kept_M, dest_M * C + pos_M, ep * C)
    send_eR = jnp.full((ep * C,), E_l, jnp.int32).at[slot_M].set(e_M % E_l, mode="drop")
    return slot_M, send_eR, jnp.sum(~kept_M).astype(jnp.float32)


def _dispatch_rows(a_nC, slot_M, order_R, *, K: int, R: int, axis: str):
    """The route to the experts: a token's row to each of its kept pairs' slots, `all_to_all` over
    `axis`, then the received rows sorted by local expert. a [n, C] (any dtype) -> [R, C]."""
    send_RC = jnp.zeros((R,) + a_nC.shape[1:], a_nC.dtype).at[slot_M].set(
        jnp.repeat(a_nC, K, axis=0), mode="drop")
    return jax.lax.all_to_all(send_RC, axis, 0, 0, tiled=True)[order_R]


def _device_dispatch(x_nD, weights_nK, indices_nK, gate, up, down, *, ep: int, C: int, axis: str,
                     token_axes: tuple[str, ...], recipe: Recipe | None):
    """The shard_map body: one device's tokens through the experts of all ep devices.

    The received rows are sorted by local expert: empty slots (id E_l) sort last, past every group;
    the grouped GEMMs leave them zero and nothing reads them back. With a recipe, x is quantised here,
    before the all_to_all, which then moves FP8 rows and their float32 tile scales."""
    n, K = indices_nK.shape
    E_l = gate.shape[0]
    slot_M, send_eR, dropped = _pack(indices_nK, E_l, ep, C)
    to_experts = lambda a: jax.lax.all_to_all(a, axis, 0, 0, tiled=True)  # noqa: E731
    recv_eR = to_experts(send_eR)
    order_R = jnp.argsort(recv_eR, stable=True)
    sizes = jnp.bincount(recv_eR, length=E_l + 1)[:-1].astype(jnp.int32)
    route = functools.partial(_dispatch_rows, K=K, R=ep * C, axis=axis)
    out_sorted = grouped_swiglu(x_nD, route, (slot_M, order_R), sizes, (gate, up, down), recipe)
    out_RD = unsort_rows(out_sorted, order_R)
    back_RD = to_experts(out_RD)  # Block i returns to device i: the all_to_all is its own inverse.
    out_nKD = jnp.take(back_RD, slot_M, axis=0, mode="fill", fill_value=0).reshape(n, K, -1)
    y_nD = jnp.einsum("nK,nKD->nD", weights_nK.astype(out_nKD.dtype), out_nKD).astype(x_nD.dtype)
    return y_nD, jax.lax.psum(dropped, token_axes) if token_axes else dropped


def ep_dispatch(x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray, w: ExpertWeights, *,
                capacity_factor: float = 0.0, axis: str = "expert",
                batch_axes: tuple[str, ...] = BATCH_AXES, recipe: Recipe | None = None
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Expert-parallel dispatch under the context mesh (`jax.set_mesh`).

    x_ND [N, D] global tokens, weights_NK float32 [N, K], indices_NK int32 [N, K] global expert ids
    (distinct per token, as top-k gives), w = (gate [E, D, F], up [E, D, F], down [E, F, D]).
    Tokens are sharded over those of `batch_axes` the mesh has (which must include `axis`), experts
    over `axis`; mesh axes outside those stay automatic (the experts' math is replicated over them).
    `recipe`: FP8 recipe for the expert GEMMs and the dispatch payload (module docstring), or None.
    Returns (y [N, D] in x's dtype, dropped: float32 scalar, the (token, expert) pairs the capacity
    dropped over the whole global batch; always 0 when capacity_factor == 0).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(
            f"moe_dispatch='ep' needs a mesh with an '{axis}' axis in context (run under "
            f"jax.set_mesh(deepseek_jax.parallel.mesh.make_mesh(...))); the context mesh has axes "
            f"{tuple(mesh.axis_names)}")
    token_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    if axis not in token_axes:
        raise ValueError(f"batch_axes {batch_axes} must include the expert axis '{axis}': expert "
                         "parallelism moves tokens that are sharded over it")
    gate, up, down = w
    N, K = indices_NK.shape
    E = gate.shape[0]
    if x_ND.shape[0] != N or weights_NK.shape != (N, K):
        raise ValueError(f"x {x_ND.shape}, weights {weights_NK.shape} and indices {indices_NK.shape} "
                         "must share N (and K)")
    ep = mesh.shape[axis]
    shards = math.prod(mesh.shape[a] for a in token_axes)
    if E % ep:
        raise ValueError(f"the number of experts E={E} must be divisible by the '{axis}' axis size ep={ep}")
    if N % shards:
        raise ValueError(f"the number of tokens N={N} must be divisible by the {shards} batch shards "
                         f"(mesh axes {token_axes})")
    C = capacity(N // shards, K, E // ep, ep, capacity_factor)
    tokens, experts = P(token_axes), P(axis)
    body = jax.shard_map(
        lambda *a: _device_dispatch(*a, ep=ep, C=C, axis=axis, token_axes=token_axes, recipe=recipe),
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, experts, experts, experts), out_specs=(tokens, P()),
        axis_names=frozenset(token_axes))
    return body(x_ND, weights_NK, indices_NK, gate, up, down)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """`ep_dispatch` as the model's injected `Dispatch` (model/experts.py): hashable, so it can be a module
    attribute. capacity_factor 0 = dropless."""

    capacity_factor: float = 0.0
    axis: str = "expert"
    batch_axes: tuple[str, ...] = BATCH_AXES

    def experts_held(self, num_experts: int) -> int:
        return num_experts  # The global experts; the shard_map splits them.

    def __call__(self, x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray, w: ExpertWeights,
                 recipe: Recipe | None) -> tuple[jnp.ndarray, jnp.ndarray]:
        return ep_dispatch(x_ND, weights_NK, indices_NK, w, capacity_factor=self.capacity_factor, axis=self.axis,
                           batch_axes=self.batch_axes, recipe=recipe)


@dataclasses.dataclass(frozen=True)
class ExpertParallelInShardMap:
    """The same dispatch for a caller already inside a shard_map with `axis` manual (a pipeline stage,
    train/pipelined.py): the module holds this device's E/ep experts and routes this device's rows; the
    dropped pairs it returns are this device's (the caller sums them with the other stats)."""

    ep: int
    capacity_factor: float = 0.0
    axis: str = "expert"

    def experts_held(self, num_experts: int) -> int:
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts do not split over the {self.ep} devices of mesh axis "
                             f"'{self.axis}': use a divisor of the routed experts for parallel.expert")
        return num_experts // self.ep

    def __call__(self, x_nD: jnp.ndarray, weights_nK: jnp.ndarray, indices_nK: jnp.ndarray, w: ExpertWeights,
                 recipe: Recipe | None) -> tuple[jnp.ndarray, jnp.ndarray]:
        n, K = indices_nK.shape
        C = capacity(n, K, w[0].shape[0], self.ep, self.capacity_factor)
        return _device_dispatch(x_nD, weights_nK, indices_nK, *w, ep=self.ep, C=C, axis=self.axis, token_axes=(),
                                recipe=recipe)
