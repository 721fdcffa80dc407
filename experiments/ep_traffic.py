"""What the expert-parallel all-to-alls move (parallel/expert_parallel.py), for experiments/bench_ep.py.

Counts from shapes and routing alone, against the all-gather baseline; the benchmark cross-checks them
with the all-to-alls of the lowered program.
"""

from __future__ import annotations

import numpy as np

from deepseek_jax.parallel.pipeline.schedules import Kind


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


def pipelined_step_bytes(plan, *, act_bytes: int, layer_forward: int, layer_backward: int, layers_per_stage: int,
                         head_layers: int, slot_bytes: int) -> dict[str, int]:
    """Bytes one device sends in one pipelined training step (train/pipelined.py on the executor of
    parallel/pipeline/execute.py), counted from the plan's op table: the busiest rank's.

    ppermute: every tick sends the activation and the gradient buffers on each of the schedule's channels
    (one SPMD program: idle ranks send too), `act_bytes` each; plus the module slots fetched from their
    owners before the first tick and their gradients returned after the last (`slot_bytes` per moved slot).
    all_to_all: each F runs `layers_per_stage` MoE layers' dispatch + combine (`layer_forward` bytes each),
    each B or I their backward (`layer_backward`); the last stage's F, B and I also run the `head_layers`
    MTP blocks' MoE layers. W sends nothing.
    """
    schedule = plan.schedule
    last = schedule.num_stages - 1
    owners = [[int(stage) * schedule.num_ranks // schedule.num_stages for stage in row] for row in schedule.modules]
    per_rank = []
    for r in range(schedule.num_ranks):
        a2a = 0
        for phase_ops in (row[r] for row in plan.phases):
            for half in (h for op in phase_ops if op is not None for h in op.halves()):  # an interleaved pair: F, I
                if half.kind != Kind.WEIGHT_GRAD:
                    per_layer = layer_forward if half.kind == Kind.FORWARD else layer_backward
                    a2a += per_layer * (layers_per_stage + (head_layers if half.stage == last else 0))
        neighbours = sum(1 for _, direction in plan.channels if 0 <= r + direction < schedule.num_ranks)
        moved_slots = sum(1 for owner in owners[r] if owner != r)
        per_rank.append({"ppermute": plan.num_ticks * neighbours * act_bytes + 2 * moved_slots * slot_bytes,
                         "all_to_all": a2a})
    return max(per_rank, key=lambda d: d["ppermute"] + d["all_to_all"])
