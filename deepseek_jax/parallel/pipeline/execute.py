"""Runs any pipeline schedule for real: one `jax.shard_map` over the mesh's 'stage' axis.

Legend: P ranks (the 'stage' mesh axis), K module slots per rank, S stages, M micro-batches,
T lock-step ticks, N slots of a buffer, R data shards (the product of the mesh's other axes).

    pipeline_gradients(plan, stage_fn, stage_params [S, ...], shared_params, inputs [M, ...], ...)
        -> PipelineResult(loss, grads {'stage': [S, ...], 'shared': ...}, stats [S, ...])

Inside the shard_map every rank runs the same program: a `lax.scan` over the T ticks of the plan's
op table (tables.py), so compile time does not depend on M. Each rank reads its row of the table
(`lax.axis_index('stage')`) and runs the tick's two phases, each with `lax.switch` on its branch
(backward_split.py derives F, B, I, W from the stage function; W contracts what I kept and never
redoes the input-gradient chain):
  forward phase    F (or idle) on module slot k, while explicit `lax.ppermute`s move the previous
                   backward phase's input gradients to their neighbours; they are stored after it;
  backward phase   B, I or W (or idle), while `ppermute`s move the forward phase's activations; they
                   are stored after it.
An interleaved plan's forward phase also has a PAIR branch: an F&B pair's F and I in one computation
(named scopes PAIR_FORWARD, PAIR_INPUT_GRAD), neither reading what the other computes, so each half's
all-to-alls have the other half's compute beside them; the I's gradient travels during the backward
phase, beside the B's W.
Activations and gradients travel rightwards and leftwards (DualPipe uses all four channels; a rank
sending to itself, as at DualPipeV's turn, writes straight into its own inbox). So in the compiled
tick every `collective-permute` has a phase's computation that neither feeds it nor consumes it (an
F&B pair sends F's output while its B computes), XLA's asynchronous collective scheduling (GPU, TPU)
can overlap them, and a hop still costs one tick. CPU XLA emits synchronous collective-permutes, so
on CPU the overlap exists only in the dependency graph (tests/test_execute.py checks it there) and
cannot be timed.

Data parallelism: the mesh's other axes (e.g. 'data') split the rows of every micro-batch, so the
R devices of one pipeline rank run the same op table on their own rows, each group of P devices with
the same data coordinate forming its own pipeline (the `ppermute`s move along 'stage' only). Losses,
gradients and stats are summed over the R shards once, after the last tick, as a data-parallel
all-reduce after gradient accumulation.

Parameters: the [S, ...] stage parameters are split over the ranks in contiguous blocks of S/P stages
(rank q owns stages q S/P .. (q+1) S/P - 1: its own stage, when S = P). Rank r runs module slot k =
stage `schedule.modules[r][k]` (DualPipe: stages r and P-1-r, so every stage twice; DualPipeV:
stages r and 2P-1-r), fetched from its owner before the first tick by explicit `ppermute`s (one per
slot and owned position; a rank that owns its slot's stage keeps it in place). Gradients accumulate
per slot and travel back to the owner the same way after the last tick, where the copies of a stage
are summed before any optimizer sees them, so the update equals the un-pipelined one.
`shared_params` (embedding, output head: used by the first and last stages) enter the shard_map
replicated over 'stage' (split over the other axes only as `shared_specs` says, e.g. the MTP modules'
routed experts over 'expert'): the trainer stores them split over 'stage' (train/placement.py), so XLA
gathers them at the shard_map's boundary; their gradients are summed over ranks.

Memory trade-offs of running one SPMD program: every rank allocates every buffer at the largest
size any rank needs, the residuals of the stage function's conditional parts (first-stage embedding,
last-stage head) are part of every stash slot (train/pipelined.py recomputes its head in the
backward, so there they are the head's input), and the gathered shared parameters and their gradient
accumulators live on all ranks during the step. `recording_rank_buffers` reports these sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.parallel.pipeline import backward_split
from deepseek_jax.parallel.pipeline.tables import CHANNELS, Branch, Field, Plan, build_plan

AXIS = "stage"
# The named scopes of an interleaved pair's two halves (in the compiled program's op names).
PAIR_FORWARD, PAIR_INPUT_GRAD = "pair_forward", "pair_input_grad"


class StageContext(NamedTuple):
    """What a stage function sees besides its parameters and input activation (not differentiated).

    batch: the micro-batch's slice of `inputs` (leading M axis removed).
    stage: int32 scalar, the global stage (0 .. S-1), for first/last-stage extras.
    stage_consts: the stage's slice of `stage_consts` (e.g. routing biases of its layers).
    consts: `consts`, the same for every call (loss normalisers, ...).
    """

    batch: Any
    stage: jnp.ndarray
    stage_consts: Any
    consts: Any


class PipelineResult(NamedTuple):
    loss: jnp.ndarray  # float32 scalar: sum over micro-batches and stages of the stage losses.
    grads: dict  # {'stage': [S, ...] (copies summed), 'shared': ...}
    stats: Any  # [S, ...]: each stage's stats summed over micro-batches (and copies).


@dataclasses.dataclass(frozen=True)
class RankBuffers:
    """Per-device bytes of what one rank program holds through its ticks, read from the traced
    program (for memory plans: `recording_rank_buffers`). Every rank allocates all of it (one SPMD
    program); the activations stash is `num_stash` slots of `stash_slot` bytes, one micro-batch each."""

    stash_slot: int  # one micro-batch's residuals, F -> B (or W)
    num_stash: int
    wstash_slot: int  # one micro-batch's weight-use gradients, I -> W
    num_wstash: int
    inboxes: int  # act_in + grad_in + the in-flight act_out / grad_out
    slot_params: int  # the K module slots' stage parameters, fetched from their owners
    shared_params: int  # embedding, head, dense layers, MTP: gathered for the step
    stage_grads: int  # the K slots' gradient accumulators
    shared_grads: int  # the shared parameters' gradient accumulator


_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("rank_buffers", default=None)


@contextlib.contextmanager
def recording_rank_buffers():
    """Within it, every `pipeline_gradients` that is traced appends its `RankBuffers` to the list this
    yields (trace with `jax.eval_shape` to plan memory without allocating anything)."""
    log: list[RankBuffers] = []
    token = _RECORDING.set(log)
    try:
        yield log
    finally:
        _RECORDING.reset(token)


def _nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def make_stage_mesh(num_ranks: int, devices=None) -> jax.sharding.Mesh:
    """A 1-D ('stage',) mesh over the first `num_ranks` devices, with the Auto axis type of the
    trainer's meshes (parallel/mesh.py; inside the shard_map the axis is manual either way)."""
    devices = jax.devices()[:num_ranks] if devices is None else devices
    if len(devices) < num_ranks:
        raise ValueError(f"a pipeline over {num_ranks} ranks needs {num_ranks} devices, found {len(devices)}")
    return jax.make_mesh((num_ranks,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def _place(tree, mesh, spec):
    """Lays `tree` out as `spec` (one PartitionSpec, or a tree of them matching `tree`) on `mesh`
    (reshard on Explicit axes, a constraint on Auto ones)."""
    explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)

    def place(a, leaf_spec):
        sharding = NamedSharding(mesh, leaf_spec)
        return jax.sharding.reshard(a, sharding) if explicit else lax.with_sharding_constraint(a, sharding)

    specs = spec if not isinstance(spec, P) else jax.tree.map(lambda _: spec, tree)
    return jax.tree.map(place, tree, specs, is_leaf=lambda x: x is None)


def _axes_of(spec: P) -> set[str]:
    """The mesh axes a PartitionSpec splits over."""
    return {a for d in spec if d is not None for a in (d if isinstance(d, tuple) else (d,))}


def _slot_routes(modules: np.ndarray, per_rank: int):
    """Yields (k, j, pairs): for slot k and position j of an owner's block of S/P stages, the
    (owner, runner) rank pairs such that the runner's slot k is the owner's stage at position j."""
    num_ranks, num_slots = modules.shape
    for k in range(num_slots):
        for j in range(per_rank):
            pairs = [(int(modules[r, k]) // per_rank, r) for r in range(num_ranks) if modules[r, k] % per_rank == j]
            if pairs:
                yield k, j, pairs


def _move(x, pairs):
    """`x` from each pair's first rank to its second; ranks no pair sends to get zeros. Without a
    transfer when every pair stays on its rank."""
    return x if all(a == b for a, b in pairs) else lax.ppermute(x, AXIS, pairs)


def _fetch_slots(owned, modules: np.ndarray):
    """owned [S/P, ...]: this rank's block of the stage-indexed tree -> [K, ...], slot k = stage
    modules[rank, k], moved from its owner (one ppermute per slot and owned position)."""
    per_rank = jax.tree.leaves(owned)[0].shape[0]
    rank = lax.axis_index(AXIS)
    slots = [jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), owned) for _ in range(modules.shape[1])]
    for k, j, pairs in _slot_routes(modules, per_rank):
        runs = jnp.asarray(np.isin(np.arange(modules.shape[0]), [r for _, r in pairs]))[rank]
        slots[k] = jax.tree.map(lambda a, v: jnp.where(runs, _move(a[j], pairs), v), owned, slots[k])
    return jax.tree.map(lambda *a: jnp.stack(a), *slots)


def _return_slots(per_slot, modules: np.ndarray, per_rank: int):
    """Inverse of `_fetch_slots` with a sum: per_slot [K, ...] -> [S/P, ...], each owned stage's
    values summed over the slots (on any rank) that ran it."""
    rank = lax.axis_index(AXIS)
    owned = jax.tree.map(lambda a: jnp.zeros((per_rank,) + a.shape[1:], a.dtype), per_slot)
    for k, j, pairs in _slot_routes(modules, per_rank):
        back = [(r, owner) for owner, r in pairs]
        owns = jnp.asarray(np.isin(np.arange(modules.shape[0]), [owner for owner, _ in pairs]))[rank]
        owned = jax.tree.map(lambda o, a: o.at[j].add(jnp.where(owns, _move(a[k], back), 0)), owned, per_slot)
    return owned


def _index(tree, i):
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _add(tree, i, value):
    return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(
        a, lax.dynamic_index_in_dim(a, i, keepdims=False) + v.astype(a.dtype), i, 0), tree, value)


def _masked_set(buffer, i, value, write):
    """buffer[i] = value if write else buffer[i] (one slot read and written either way)."""
    old = lax.dynamic_index_in_dim(buffer, i, keepdims=False)
    return lax.dynamic_update_index_in_dim(buffer, jnp.where(write, value.astype(buffer.dtype), old), i, 0)


def _zeros(avals, lead=()):
    return jax.tree.map(lambda a: jnp.zeros(tuple(lead) + tuple(a.shape), a.dtype), avals)


@dataclasses.dataclass
class _Carry:
    """The per-rank state threaded through the ticks (a pytree)."""

    grads_stage: Any  # [K, ...]
    grads_shared: Any
    stats: Any  # [K, ...]
    loss: jnp.ndarray
    stash: list  # each [num_stash, ...]
    wstash: list  # each [num_wstash, ...]
    act_in: jnp.ndarray  # [num_act_in + 1, *x]  (last slot: discard)
    grad_in: jnp.ndarray  # [num_grad_in + 1, *x]
    act_out: jnp.ndarray  # [*x] what this rank's F produced in this tick's forward phase
    grad_out: jnp.ndarray  # [*x] what this rank's B or I produced in the last backward phase
    pair_grad_out: jnp.ndarray | None  # [*x] what an interleaved pair's I produced in this forward phase


jax.tree_util.register_dataclass(_Carry, data_fields=[f.name for f in dataclasses.fields(_Carry)],
                                 meta_fields=[])


def data_axes(mesh) -> tuple[str, ...]:
    """The mesh axes other than 'stage': they split the rows of every micro-batch."""
    return tuple(a for a in mesh.axis_names if a != AXIS)


def data_shards(mesh) -> int:
    """R: how many ways every micro-batch's rows are split (1 on a 'stage'-only mesh)."""
    return int(np.prod([mesh.shape[a] for a in data_axes(mesh)], dtype=np.int64))


def _rank_program(plan: Plan, stage_fn, x_aval, owned_params, shared_params, owned_consts, inputs, consts,
                  row_axes: tuple[str, ...], stage_specs, shared_specs):
    """The shard_map body: one rank's T ticks on its rows, between fetching its slots' stage params
    (and consts) from their owners and returning the slots' gradients and stats to them. Returns the
    loss, the owned stages' gradients and stats, and the shared gradients, summed over the data shards
    (`row_axes`; a parameter split over some of them, such as experts over 'expert', only over the
    others) and, for the loss and shared gradients, over the ranks."""
    num_ranks = plan.schedule.num_ranks
    modules = np.asarray(plan.schedule.modules, np.int32)  # [P, K]
    per_rank = plan.schedule.num_stages // num_ranks
    slot_params, slot_consts = _fetch_slots((owned_params, owned_consts), modules)
    rank = lax.axis_index(AXIS)
    table = jnp.asarray(plan.table)

    def context(row_mb, row_stage, slot):
        return StageContext(batch=_index(inputs, row_mb), stage=row_stage,
                            stage_consts=_index(slot_consts, slot), consts=consts)

    def params_of(slot):
        return {"stage": _index(slot_params, slot), "shared": shared_params}

    abstract_ctx = context(jnp.int32(0), jnp.int32(0), jnp.int32(0))
    params0 = params_of(0)
    zero_x = jnp.zeros(x_aval.shape, x_aval.dtype)
    split = backward_split.split_stage(stage_fn, params0, zero_x, abstract_ctx)
    stats_avals = jax.eval_shape(lambda: split.forward(params0, zero_x, abstract_ctx)[1])

    # Each phase's switch sees only that phase's operands (read from the buffers before it) and returns
    # only its results (written to the buffers after it): the buffers never pass through the
    # conditional, which would make XLA copy every one of them in every tick.
    def forward(ops):
        (y, loss), stats, stash = split.forward(ops["params"], ops["x"], ops["ctx"])
        return {"y": y, "loss": loss, "stats": stats, "stash": stash}

    def backward(ops, kind):
        out = {"d_x": zero_x, "wstash": _zeros(list(split.wstash_avals)),
               "d_params": jax.tree.map(jnp.zeros_like, params0)}
        if kind == Branch.B:
            out["d_params"], out["d_x"] = split.backward(ops["params"], ops["ctx"], ops["stash"], ops["ct"])
        elif kind == Branch.I:
            out["d_x"], out["wstash"], out["d_params"] = split.input_grad(ops["params"], ops["ctx"], ops["stash"],
                                                                          ops["ct"])
        elif kind == Branch.W:
            out["d_params"] = split.weight_grad(ops["params"], ops["ctx"], ops["stash"], ops["wstash"])
        return out

    # An interleaved pair: the F of one micro-batch and the I of another in one computation; neither
    # reads what the other computes, so each one's all-to-alls have the other's compute beside them.
    pairs = Branch.PAIR in plan.forward_branches

    def pair(ops):
        with jax.named_scope(PAIR_FORWARD):
            out = forward(ops)
        with jax.named_scope(PAIR_INPUT_GRAD):
            out["pair"] = backward(ops["pair"], Branch.I)
        return out

    forward_ops = {"params": params0, "x": zero_x, "ctx": abstract_ctx}
    if pairs:
        forward_ops["pair"] = {"ct": zero_x, "stash": [_zeros(a) for a in split.stash_avals], "params": params0,
                               "ctx": abstract_ctx}
    forward_idle = jax.eval_shape(pair if pairs else forward, forward_ops)
    forward_branches = {Branch.IDLE: lambda ops: _zeros(forward_idle), Branch.PAIR: pair,
                        Branch.F: lambda ops: {**forward(ops), "pair": _zeros(forward_idle["pair"])} if pairs
                        else forward(ops)}
    forward_branches = [forward_branches[b] for b in plan.forward_branches]
    backward_branches = [functools.partial(backward, kind=b) for b in plan.backward_branches]

    def switch_index(used, branch):
        index = np.zeros(len(Branch), np.int32)
        index[list(used)] = np.arange(len(used))
        return jnp.asarray(index)[branch]

    def forward_phase(c: _Carry, row) -> _Carry:
        slot, src = jnp.maximum(row[Field.F_SLOT], 0), row[Field.F_IN]
        operands = dict(x=jnp.where(src >= 0, c.act_in[jnp.maximum(src, 0)], zero_x), params=params_of(slot),
                        ctx=context(row[Field.F_MB], row[Field.F_STAGE], slot))
        if pairs:  # the pair's I reads its stash slot here, before the F writes its own
            i_slot, i_src = jnp.maximum(row[Field.P_SLOT], 0), row[Field.P_IN]
            i_stash = jnp.maximum(row[Field.P_STASH], 0)
            operands["pair"] = dict(ct=jnp.where(i_src >= 0, c.grad_in[jnp.maximum(i_src, 0)], zero_x),
                                    stash=[b[i_stash] for b in c.stash], params=params_of(i_slot),
                                    ctx=context(row[Field.P_MB], row[Field.P_STAGE], i_slot))
        out = lax.switch(switch_index(plan.forward_branches, row[Field.F_BRANCH]), forward_branches, operands)
        write = row[Field.F_BRANCH] != Branch.IDLE
        c.stash = [_masked_set(b, jnp.maximum(row[Field.F_STASH], 0), v, write) for b, v in zip(c.stash, out["stash"])]
        c.loss = c.loss + out["loss"]
        c.stats = _add(c.stats, slot, out["stats"])
        c.act_out = out["y"]
        if pairs:
            i = out["pair"]
            is_pair = row[Field.F_BRANCH] == Branch.PAIR
            wstash_at = jnp.maximum(row[Field.P_WSTASH], 0)
            c.wstash = [_masked_set(b, wstash_at, v, is_pair) for b, v in zip(c.wstash, i["wstash"])]
            c.grads_stage = _add(c.grads_stage, i_slot, i["d_params"]["stage"])
            c.grads_shared = jax.tree.map(jnp.add, c.grads_shared, i["d_params"]["shared"])
            c.pair_grad_out = i["d_x"]
        return c

    def backward_phase(c: _Carry, row) -> _Carry:
        slot, src = jnp.maximum(row[Field.B_SLOT], 0), row[Field.B_IN]
        stash_at, wstash_at = jnp.maximum(row[Field.B_STASH], 0), jnp.maximum(row[Field.B_WSTASH], 0)
        operands = dict(ct=jnp.where(src >= 0, c.grad_in[jnp.maximum(src, 0)], zero_x),
                        stash=[b[stash_at] for b in c.stash], wstash=[b[wstash_at] for b in c.wstash],
                        params=params_of(slot), ctx=context(row[Field.B_MB], row[Field.B_STAGE], slot))
        out = lax.switch(switch_index(plan.backward_branches, row[Field.B_BRANCH]), backward_branches, operands)
        keep_wstash = row[Field.B_BRANCH] == Branch.I
        c.wstash = [_masked_set(b, wstash_at, v, keep_wstash) for b, v in zip(c.wstash, out["wstash"])]
        c.grads_stage = _add(c.grads_stage, slot, out["d_params"]["stage"])
        c.grads_shared = jax.tree.map(jnp.add, c.grads_shared, out["d_params"]["shared"])
        c.grad_out = out["d_x"]
        return c

    def permute(value, direction):
        pairs = [(r, r + direction) for r in range(num_ranks) if 0 <= r + direction < num_ranks]
        return lax.ppermute(value, AXIS, pairs)

    def send(payload: str, value) -> dict:
        """The point-to-point transfers of `value` on the schedule's `payload` channels: {receiver's field: value}."""
        return {CHANNELS[(p, d)]: permute(value, d) for p, d in plan.channels if p == payload}

    def deliver(inbox, row, received: dict):
        for field, value in received.items():
            inbox = lax.dynamic_update_index_in_dim(inbox, value, row[field], 0)
        return inbox

    def tick(c: _Carry, rows):
        row = rows[rank]
        # Forward phase, while the previous tick's gradients travel; they are stored after it.
        received = send("grad", c.grad_out)
        received[Field.GRAD_FROM_SELF] = c.grad_out
        c = forward_phase(c, row)
        c.grad_in = deliver(c.grad_in, row, received)
        # Backward phase, while this tick's activations (and interleaved pairs' gradients) travel; they
        # are stored after it.
        received = send("act", c.act_out)
        received[Field.ACT_FROM_SELF] = c.act_out
        if pairs:
            received_grads = send("pair_grad", c.pair_grad_out)
            received_grads[Field.PAIR_GRAD_FROM_SELF] = c.pair_grad_out
        c = backward_phase(c, row)
        c.act_in = deliver(c.act_in, row, received)
        if pairs:
            c.grad_in = deliver(c.grad_in, row, received_grads)
        return c, None

    num_slots = plan.num_slots
    carry = _Carry(
        grads_stage=jax.tree.map(jnp.zeros_like, slot_params),
        grads_shared=jax.tree.map(jnp.zeros_like, shared_params),
        stats=_zeros(stats_avals, (num_slots,)),
        loss=jnp.zeros((), jnp.float32),
        stash=[jnp.zeros((max(plan.num_stash, 1),) + a.shape, a.dtype) for a in split.stash_avals],
        wstash=[jnp.zeros((max(plan.num_wstash, 1),) + a.shape, a.dtype) for a in split.wstash_avals],
        act_in=jnp.zeros((plan.num_act_in + 1,) + x_aval.shape, x_aval.dtype),
        grad_in=jnp.zeros((plan.num_grad_in + 1,) + x_aval.shape, x_aval.dtype),
        act_out=zero_x, grad_out=zero_x, pair_grad_out=zero_x if pairs else None)
    log = _RECORDING.get()
    if log is not None:
        one = lambda buffers: sum(_nbytes(b[0]) for b in buffers)  # noqa: E731
        log.append(RankBuffers(
            stash_slot=one(carry.stash), num_stash=plan.num_stash, wstash_slot=one(carry.wstash),
            num_wstash=plan.num_wstash,
            inboxes=_nbytes((carry.act_in, carry.grad_in, carry.act_out, carry.grad_out, carry.pair_grad_out)),
            slot_params=_nbytes(slot_params), shared_params=_nbytes(shared_params),
            stage_grads=_nbytes(carry.grads_stage), shared_grads=_nbytes(carry.grads_shared)))
    carry, _ = lax.scan(tick, carry, table)

    def summed(leaf, axes, spec=None):
        axes = tuple(a for a in axes if spec is None or a not in _axes_of(spec))
        return lax.psum(leaf, axes) if axes else leaf

    grads_stage = jax.tree.map(lambda g, spec: summed(g, row_axes, spec), carry.grads_stage, stage_specs)
    stats = jax.tree.map(lambda a: summed(a, row_axes), carry.stats)
    everywhere = (AXIS,) + row_axes
    grads_shared = jax.tree.map(lambda g, spec: summed(g, everywhere, spec), carry.grads_shared, shared_specs)
    return (lax.psum(carry.loss, everywhere), _return_slots(grads_stage, modules, per_rank), grads_shared,
            _return_slots(stats, modules, per_rank))


def pipeline_gradients(plan: Plan | Any, stage_fn, stage_params, shared_params, inputs, *, mesh,
                       x_aval: jax.ShapeDtypeStruct, stage_consts=None, consts=None,
                       stage_specs=None, shared_specs=None) -> PipelineResult:
    """Loss, gradients and stats of M micro-batches through S stages, run as `plan` schedules them.

    Args:
      plan: a `tables.Plan` (or a `Schedule`, planned by `tables.build_plan`).
      stage_fn: `stage_fn(params, x, ctx) -> ((y, loss), stats)`, params = {'stage': one stage's
        slice of `stage_params`, 'shared': `shared_params`}, ctx a `StageContext`. Every stage runs
        the same function; it reads `ctx.stage` for first/last-stage extras (the first stage gets
        x = 0, the last stage's y gets a zero gradient).
      stage_params: pytree of [S, ...] arrays.
      shared_params: pytree used by any stage (gathered onto every rank for the step, each leaf split
        only as `shared_specs` says).
      inputs: pytree of [M, b, ...] arrays, micro-batch g = direction * (M / directions) + m; the b rows
        are split over the mesh's other axes (data parallelism), so b must be a multiple of R.
      mesh: a mesh with a 'stage' axis of size P (e.g. `make_stage_mesh(P)`), possibly with more axes
        (e.g. parallel/mesh.py's ('stage', 'data', 'expert', 'tensor')), all of which split rows.
      x_aval: shape and dtype of one micro-batch's activation passed between stages, rows first
        ([b, ...]; each device passes its [b / R, ...]).
      stage_consts: pytree of [S, ...] arrays, not differentiated (e.g. routing biases).
      consts: pytree passed to every stage call, not differentiated.
      stage_specs: pytree like `stage_params` of PartitionSpecs for each leaf's dims after the stage
        axis, over the mesh's other axes (e.g. routed experts over 'expert'): the stage function then
        sees its slice and communicates within its rank's devices itself; default: replicated.
      shared_specs: the same for `shared_params` (e.g. the MTP modules' routed experts over 'expert').

    Call it under `jax.jit`.
    """
    if not isinstance(plan, Plan):
        plan = build_plan(plan)
    schedule = plan.schedule
    if mesh.shape[AXIS] != schedule.num_ranks:
        raise ValueError(f"the schedule has {schedule.num_ranks} ranks but mesh axis '{AXIS}' has "
                         f"{mesh.shape[AXIS]} devices; build the schedule for {mesh.shape[AXIS]} ranks")
    for leaf in jax.tree.leaves(stage_params) + jax.tree.leaves(stage_consts):
        if leaf.shape[0] != schedule.num_stages:
            raise ValueError(f"stage_params / stage_consts need a leading axis of {schedule.num_stages} "
                             f"stages, got shape {leaf.shape}")
    rows, row_axes = data_shards(mesh), data_axes(mesh)
    for leaf in jax.tree.leaves(inputs):
        if leaf.ndim < 2 or leaf.shape[0] != schedule.num_microbatches or leaf.shape[1] % rows:
            raise ValueError(f"inputs need shape [{schedule.num_microbatches} micro-batches, rows, ...] with rows a "
                             f"multiple of the {rows} data shards of mesh axes {row_axes}, got shape {leaf.shape}")
    if x_aval.shape[0] % rows:
        raise ValueError(f"x_aval's leading (row) axis {x_aval.shape} does not split into {rows} data shards")
    local_x = jax.ShapeDtypeStruct((x_aval.shape[0] // rows,) + tuple(x_aval.shape[1:]), x_aval.dtype)
    stage_consts = {} if stage_consts is None else stage_consts
    consts = {} if consts is None else consts
    stage_specs = jax.tree.map(lambda _: P(), stage_params) if stage_specs is None else stage_specs
    param_specs = jax.tree.map(lambda spec: P(AXIS, *spec), stage_specs, is_leaf=lambda x: isinstance(x, P))
    stage_params = _place(stage_params, mesh, param_specs)  # S/P stages per rank, each maybe split further
    stage_consts = _place(stage_consts, mesh, P(AXIS))
    shared_specs = jax.tree.map(lambda _: P(), shared_params) if shared_specs is None else shared_specs
    shared_params = _place(shared_params, mesh, shared_specs)
    consts = _place(consts, mesh, P())
    rows_spec = P(None, row_axes or None)  # [M, b, ...]: rows split over the data shards.
    inputs = _place(inputs, mesh, rows_spec)

    def body(owned_params, shared_params, owned_consts, inputs, consts):
        return _rank_program(plan, stage_fn, local_x, owned_params, shared_params, owned_consts, inputs, consts,
                             row_axes, stage_specs, shared_specs)

    # Every axis manual: the data shards are explicit too, so the stage function sees plain local
    # arrays and the only collectives are the ppermutes and the final sums. check_vma=False: values are
    # replicated or varying by construction (the loop carry starts replicated and becomes per-rank),
    # and nothing here is differentiated through the shard_map.
    run = jax.shard_map(body, mesh=mesh, in_specs=(param_specs, shared_specs, P(AXIS), rows_spec, P()),
                        out_specs=(P(), param_specs, shared_specs, P(AXIS)), axis_names=set(mesh.axis_names),
                        check_vma=False)
    loss, stage_grads, shared_grads, stage_stats = run(stage_params, shared_params, stage_consts, inputs, consts)
    return PipelineResult(loss=loss, grads={"stage": stage_grads, "shared": shared_grads}, stats=stage_stats)
