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

With `capacity_factor=0` (the default) C = n*min(K, E_l), the most one destination can receive from n
tokens, so nothing is ever dropped and the result equals `dense_dispatch`. The buffers are padded to C
rows per destination because XLA:CPU has no `ragged_all_to_all`; on GPU/TPU that collective would send
only the occupied rows. That variant was not written or measured here.

`dispatch_bytes` and `payload_rows` count what these all-to-alls move, against an all-gather baseline,
for the benchmark.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import remat
from deepseek_jax.model.experts import ExpertWeights


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


def _pack(x_nD, indices_nK, E_l: int, ep: int, C: int):
    """Places each pair in its destination's block. Returns (send_x [R, D], local expert ids [R] with
    E_l in empty slots, slot of each pair [M] (R where dropped), dropped count)."""
    n, K = indices_nK.shape
    e_M = indices_nK.reshape(-1)
    dest_M = e_M // E_l
    onehot_Mp = jax.nn.one_hot(dest_M, ep, dtype=jnp.int32)
    # Rank of each pair among the earlier pairs with the same destination: first come, first kept.
    pos_M = jnp.sum(jnp.cumsum(onehot_Mp, axis=0) * onehot_Mp, axis=-1) - 1
    kept_M = pos_M < C
    slot_M = jnp.where(kept_M, dest_M * C + pos_M, ep * C)
    token_M = jnp.arange(n * K) // K
    send_xRD = jnp.zeros((ep * C, x_nD.shape[1]), x_nD.dtype).at[slot_M].set(x_nD[token_M], mode="drop")
    send_eR = jnp.full((ep * C,), E_l, jnp.int32).at[slot_M].set(e_M % E_l, mode="drop")
    return send_xRD, send_eR, slot_M, jnp.sum(~kept_M).astype(jnp.float32)


def _local_experts(x_RD, e_R, w: ExpertWeights):
    """Runs the E_l local experts on the received rows. Rows with id E_l (empty slots) sort last, past
    every group; `ragged_dot` leaves them zero, and nothing reads them back. Returns [R, D]."""
    gate, up, down = w
    order = jnp.argsort(e_R, stable=True)
    sizes = jnp.bincount(e_R, length=gate.shape[0] + 1)[:-1].astype(jnp.int32)
    x_sorted = x_RD[order]
    gate_RF = checkpoint_name(jax.lax.ragged_dot(x_sorted, gate, sizes), remat.EXPERTS)
    up_RF = checkpoint_name(jax.lax.ragged_dot(x_sorted, up, sizes), remat.EXPERTS)
    out_RD = checkpoint_name(jax.lax.ragged_dot(nn.silu(gate_RF) * up_RF, down, sizes), remat.EXPERTS)
    return jnp.zeros_like(out_RD).at[order].set(out_RD)


def _device_dispatch(x_nD, weights_nK, indices_nK, gate, up, down, *, ep: int, C: int, axis: str,
                     token_axes: tuple[str, ...]):
    """The shard_map body: one device's tokens through the experts of all ep devices."""
    n, K = indices_nK.shape
    send_xRD, send_eR, slot_M, dropped = _pack(x_nD, indices_nK, gate.shape[0], ep, C)
    to_experts = lambda a: jax.lax.all_to_all(a, axis, 0, 0, tiled=True)  # noqa: E731
    out_RD = _local_experts(to_experts(send_xRD), to_experts(send_eR), (gate, up, down))
    back_RD = to_experts(out_RD)  # Block i returns to device i: the all_to_all is its own inverse.
    out_nKD = jnp.take(back_RD, slot_M, axis=0, mode="fill", fill_value=0).reshape(n, K, -1)
    y_nD = jnp.einsum("nK,nKD->nD", weights_nK.astype(out_nKD.dtype), out_nKD).astype(x_nD.dtype)
    return y_nD, jax.lax.psum(dropped, token_axes)


def ep_dispatch(x_ND: jnp.ndarray, weights_NK: jnp.ndarray, indices_NK: jnp.ndarray, w: ExpertWeights, *,
                capacity_factor: float = 0.0, axis: str = "expert",
                batch_axes: tuple[str, ...] = ("data", "expert")) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Expert-parallel dispatch under the context mesh (`jax.set_mesh`).

    x_ND [N, D] global tokens, weights_NK float32 [N, K], indices_NK int32 [N, K] global expert ids
    (distinct per token, as top-k gives), w = (gate [E, D, F], up [E, D, F], down [E, F, D]).
    Tokens are sharded over those of `batch_axes` the mesh has (which must include `axis`), experts
    over `axis`; mesh axes outside those stay automatic (the experts' math is replicated over them).
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
        lambda *a: _device_dispatch(*a, ep=ep, C=C, axis=axis, token_axes=token_axes), mesh=mesh,
        in_specs=(tokens, tokens, tokens, experts, experts, experts), out_specs=(tokens, P()),
        axis_names=frozenset(token_axes))
    return body(x_ND, weights_NK, indices_NK, gate, up, down)


def dispatch_bytes(n_tokens_per_device: int, K: int, D: int, ep: int, capacity: int, itemsize: int
                   ) -> dict[str, int]:
    """Bytes one device sends to other devices per MoE layer (forward), padding included.

    ep_dispatch / ep_combine: the (ep-1) off-device blocks of C rows x D of the two all-to-alls (the
    block addressed to itself stays local); ep_ids: the int32 expert ids sent with the dispatch.
    ep_uniform_payload: the rows that would carry tokens under perfectly uniform routing, both ways
    (n*K*(ep-1)/ep each); the real payload is data-dependent, see `payload_rows`.
    allgather / reduce_scatter: the baseline in which every device gathers the other devices' n tokens,
    runs its experts on all of them, and reduce-scatters the partial outputs back.
    """
    n, C = n_tokens_per_device, capacity
    block = C * D * itemsize
    out = {"ep_dispatch": (ep - 1) * block, "ep_combine": (ep - 1) * block, "ep_ids": (ep - 1) * C * 4,
           "ep_uniform_payload": 2 * n * K * (ep - 1) * D * itemsize // ep,
           "allgather": (ep - 1) * n * D * itemsize, "reduce_scatter": (ep - 1) * n * D * itemsize}
    out["ep_total"] = out["ep_dispatch"] + out["ep_combine"] + out["ep_ids"]
    out["allgather_total"] = out["allgather"] + out["reduce_scatter"]
    return out


def payload_rows(indices_NK, E: int, ep: int, batch_shards: int) -> np.ndarray:
    """Routed pairs per (source batch shard, destination expert device), before any capacity: [S, ep]
    int64 with S = batch_shards. Shard s holds tokens [s*n, (s+1)*n) and, with batch axes ('data',
    'expert'), sits at expert coordinate s % ep: column s % ep stays on the device, the other columns
    (each capped at C when a capacity is set) are the rows that carry tokens over the links."""
    idx = np.asarray(indices_NK)
    N, K = idx.shape
    if N % batch_shards or E % ep:
        raise ValueError(f"N={N} must divide into {batch_shards} batch shards and E={E} into ep={ep}")
    dest = (idx // (E // ep)).reshape(batch_shards, -1)
    return np.stack([np.bincount(d, minlength=ep) for d in dest]).astype(np.int64)
