"""What the expert-parallel all-to-alls move (parallel/expert_parallel.py), for experiments/bench_ep.py.

Counts from shapes and routing alone, against the all-gather baseline; the benchmark cross-checks them
with the all-to-alls of the lowered program.
"""

from __future__ import annotations

import numpy as np


def dispatch_bytes(n_tokens_per_device: int, K: int, D: int, ep: int, capacity: int, itemsize: int,
                   fp8_tile: int = 0) -> dict[str, int]:
    """Bytes one device sends to other devices per MoE layer (forward), padding included.

    ep_dispatch / ep_combine: the (ep-1) off-device blocks of C rows x D of the two all-to-alls (the
    block addressed to itself stays local); ep_ids: the int32 expert ids sent with the dispatch.
    ep_uniform_payload: the rows that would carry tokens under perfectly uniform routing, both ways
    (n*K*(ep-1)/ep each); the real payload is data-dependent, see `payload_rows`.
    allgather / reduce_scatter: the baseline in which every device gathers the other devices' n tokens,
    runs its experts on all of them, and reduce-scatters the partial outputs back.
    fp8_tile > 0: the FP8 dispatch, 1 byte per value plus a float32 scale per 1 x fp8_tile tile of a row;
    the combine stays at `itemsize`.
    """
    n, C = n_tokens_per_device, capacity
    row_out = D * itemsize
    row_in = D + 4 * -(-D // fp8_tile) if fp8_tile else row_out
    out = {"ep_dispatch": (ep - 1) * C * row_in, "ep_combine": (ep - 1) * C * row_out,
           "ep_ids": (ep - 1) * C * 4,
           "ep_uniform_payload": n * K * (ep - 1) * (row_in + row_out) // ep,
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
