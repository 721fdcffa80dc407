"""A schedule compiled to lock-step int32 op tables and buffer slots, for the executor.

Legend: P ranks, T ticks.

Every tick has two phases, run by every rank in lock step:
  forward phase    each rank runs at most one F; meanwhile the input gradients the previous tick's
                   backward phase produced travel to their ranks;
  backward phase   each rank runs at most one B, I or W; meanwhile the activations this tick's forward
                   phase produced travel to theirs.
So every send has the other phase's compute beside it (an F&B pair is one tick: F's output leaves
while B computes, B's output while the next tick's F computes), and a hop costs one tick: an
activation made in tick t is used from tick t+1's forward phase on, a gradient made in tick t from
tick t+1's backward phase on; a rank's own F can be followed by its B in the same tick.

Interleaved pairs (`build_plan(schedule, interleave_pairs=True)`): an F&B pair runs its F and its
I (the input-gradient half of its B) in one computation in the forward phase, and the B's W in the
backward phase. Neither half reads what the other computes, so each one's expert all-to-alls can
travel while the other computes (report Figure 4); the I's gradient leaves during the backward phase
beside W and the activations, and is used from tick t+1's forward phase on (a pair's I can then
consume it there).

`build_plan(schedule)` places every rank's ops, in the schedule's order, at the earliest phase their
inputs allow (all schedule logic stays in schedules.py; this is placement and bookkeeping) and turns
the result into an int32 table [ticks, ranks, fields]: what every rank computes in each phase (which
branch, module slot, stage, micro-batch), which buffer slot each operand comes from and each result
goes to, and where the values arriving from the neighbours are stored. `Plan.makespan(cost)` replays
the table with a cost per op (each phase as long as its slowest rank's op): the executor's time on a
machine where every rank takes those times, to set beside the asynchronous `simulate`.

Buffers per rank (sizes are the maximum over ranks; every rank runs the same SPMD program):
  stash      residuals F keeps for the backward of one micro-batch, live from F to B, or to W when
             the backward is split (its size is the peak of live activations in the executed timeline);
  wstash     the output gradients of the weight uses that I keeps for W, live from I to W;
  act_in     activations received and not yet consumed by their F;
  grad_in    gradients received and not yet consumed by their B or I.
Each inbox has one extra "discard" slot (index = its size) that arrivals nobody waits for go to.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import numpy as np

from deepseek_jax.parallel.pipeline.schedules import Kind, Op, Schedule
from deepseek_jax.parallel.pipeline.simulate import CostModel, DeadlockError, TimedOp, Timeline, peak_activations


class Branch(enum.IntEnum):
    """What one rank computes in one phase (the `lax.switch` index of that phase)."""

    IDLE = 0
    F = 1
    B = 2  # full backward
    I = 3  # noqa: E741  input-gradient backward; its W runs later
    W = 4
    PAIR = 5  # the F and the I of an interleaved F&B pair, in one computation (forward phase)


FORWARD_BRANCHES = (Branch.IDLE, Branch.F, Branch.PAIR)
BACKWARD_BRANCHES = (Branch.IDLE, Branch.B, Branch.I, Branch.W)


class Field(enum.IntEnum):
    """Columns of the op table. F_* describe the forward phase, B_* the backward phase (B, I or W),
    P_* the I of an interleaved pair (forward phase, F_BRANCH = PAIR)."""

    F_BRANCH = 0  # Branch.IDLE, F or PAIR
    F_SLOT = 1  # local module slot
    F_STAGE = 2  # global stage
    F_MB = 3  # micro-batch index into the inputs (direction * per-direction count + micro-batch)
    F_IN = 4  # act_in slot holding the input activation; -1 at stage 0
    F_STASH = 5  # stash slot the residuals go to
    B_BRANCH = 6  # Branch.IDLE, B, I or W
    B_SLOT = 7
    B_STAGE = 8
    B_MB = 9
    B_IN = 10  # grad_in slot holding the output gradient; -1 at the last stage (and for W)
    B_STASH = 11  # stash slot with this micro-batch's residuals
    B_WSTASH = 12  # wstash slot I writes / W reads
    ACT_FROM_LEFT = 13  # act_in slot for the activation arriving from rank r-1 (discard slot if none)
    ACT_FROM_RIGHT = 14
    ACT_FROM_SELF = 15  # act_in slot for this tick's own activation (DualPipeV's turn)
    GRAD_FROM_LEFT = 16  # grad_in slot for the gradient arriving (during this tick's forward phase)
    GRAD_FROM_RIGHT = 17
    GRAD_FROM_SELF = 18  # grad_in slot for the previous tick's own gradient (DualPipeV's turn)
    P_SLOT = 19
    P_STAGE = 20
    P_MB = 21
    P_IN = 22  # grad_in slot holding the pair's output gradient; -1 at the last stage
    P_STASH = 23
    P_WSTASH = 24  # wstash slot the pair's I writes
    PAIR_GRAD_FROM_LEFT = 25  # grad_in slot for a pair's gradient arriving (during the backward phase)
    PAIR_GRAD_FROM_RIGHT = 26
    PAIR_GRAD_FROM_SELF = 27


NUM_FIELDS = len(Field)
_FORWARD, _BACKWARD = 0, 1  # the two phases of a tick

# Channels: (payload, direction of travel) -> the field where the receiver stores it.
CHANNELS = {("act", +1): Field.ACT_FROM_LEFT, ("act", -1): Field.ACT_FROM_RIGHT,
            ("grad", +1): Field.GRAD_FROM_LEFT, ("grad", -1): Field.GRAD_FROM_RIGHT,
            ("pair_grad", +1): Field.PAIR_GRAD_FROM_LEFT, ("pair_grad", -1): Field.PAIR_GRAD_FROM_RIGHT}
_SELF = {"act": Field.ACT_FROM_SELF, "grad": Field.GRAD_FROM_SELF, "pair_grad": Field.PAIR_GRAD_FROM_SELF}
_BRANCH = {Kind.FORWARD: Branch.F, Kind.BACKWARD: Branch.B, Kind.INPUT_GRAD: Branch.I, Kind.WEIGHT_GRAD: Branch.W}

OpCost = Callable[[Op], float]  # seconds (or units) of one computation: F, B, I or W of one stage


def op_cost(cost: CostModel) -> OpCost:
    """The per-op cost of a `CostModel`: an F&B pair costs its two halves, one per phase, or, when
    interleaved, its F and I together in the forward phase (the simulator's pair with its W deferred)."""
    return cost.duration


@dataclasses.dataclass(frozen=True)
class Plan:
    """A schedule ready to execute.

    Attributes:
      schedule: the schedule.
      phases: [tick][rank] -> (the F of its forward phase, the B/I/W of its backward phase), None = idle;
        an interleaved pair's forward-phase op is an OVERLAPPED op whose halves are its F and its I.
      table: int32 [ticks, ranks, NUM_FIELDS].
      forward_branches, backward_branches: the branches each phase uses (others are not compiled).
      channels: the (payload, +1 right / -1 left) point-to-point channels the schedule uses.
      num_stash, num_wstash, num_act_in, num_grad_in: buffer slots per rank (inboxes without the
        discard slot).
    """

    schedule: Schedule
    phases: tuple[tuple[tuple[Op | None, Op | None], ...], ...]
    table: np.ndarray
    forward_branches: tuple[Branch, ...]
    backward_branches: tuple[Branch, ...]
    channels: tuple[tuple[str, int], ...]
    num_stash: int
    num_wstash: int
    num_act_in: int
    num_grad_in: int

    @property
    def num_ticks(self) -> int:
        return self.table.shape[0]

    @property
    def num_slots(self) -> int:
        return len(self.schedule.modules[0])

    def timeline(self, cost: OpCost) -> tuple[float, tuple[tuple[TimedOp, ...], ...]]:
        """(makespan, [rank] -> its computations with start and end times) of the lock-step execution:
        each phase lasts as long as the longest op any rank runs in it (an idle phase takes no time)."""
        now, timed = 0.0, [[] for _ in range(self.schedule.num_ranks)]
        for row in self.phases:
            for phase in (_FORWARD, _BACKWARD):
                lengths = [cost(ops[phase]) if ops[phase] is not None else 0.0 for ops in row]
                for r, ops in enumerate(row):
                    if ops[phase] is not None:
                        timed[r].append(TimedOp(ops[phase], now, now + lengths[r]))
                now += max(lengths)
        return now, tuple(tuple(t) for t in timed)

    def makespan(self, cost: OpCost) -> float:
        """The executor's time for one step when every op takes `cost(op)` (see `timeline`)."""
        return self.timeline(cost)[0]

    def executed(self, cost: CostModel) -> Timeline:
        """The lock-step execution under `cost` as a simulate.Timeline (bubbles, peak activations; the
        plot draws it like a simulated schedule)."""
        total, ops = self.timeline(op_cost(cost))
        busy = tuple(sum(t.end - t.start for t in rank_ops) for rank_ops in ops)
        return Timeline(schedule=self.schedule, cost=cost, ops=ops, total_time=total, busy=busy,
                        bubble=tuple(total - b for b in busy),
                        peak_activations=tuple(peak_activations(list(rank_ops)) for rank_ops in ops),
                        parameter_copies=tuple(len(held) for held in self.schedule.modules))


class _Slots:
    """Free-list allocator of one buffer on one rank; remembers the most slots ever in use."""

    def __init__(self):
        self.owner: dict = {}
        self.free: list[int] = []
        self.size = 0

    def alloc(self, key) -> int:
        if key in self.owner.values():
            raise AssertionError(f"{key} already holds a slot")
        slot = self.free.pop() if self.free else self.size
        self.size = max(self.size, slot + 1)
        self.owner[slot] = key
        return slot

    def find(self, key) -> int:
        for slot, owner in self.owner.items():
            if owner == key:
                return slot
        raise AssertionError(f"nothing stored for {key}")

    def release(self, key) -> int:
        slot = self.find(key)
        del self.owner[slot]
        self.free.append(slot)
        self.free.sort(reverse=True)  # lowest free slot first: deterministic, compact
        return slot


def _ready(half: Op, last: int, ready: dict) -> tuple[int, int] | None:
    """The earliest (tick, phase) at which `half`'s inputs are there, or None if one is not made yet."""
    d, m, s = half.direction, half.microbatch, half.stage
    if half.kind == Kind.FORWARD:
        return (0, _FORWARD) if s == 0 else ready.get(("act", d, m, s - 1))
    if half.kind == Kind.WEIGHT_GRAD:
        return ready.get(("input_grad", d, m, s))
    needs = [ready.get(("own", d, m, s))] + ([ready.get(("grad", d, m, s + 1))] if s < last else [])
    return None if None in needs else max(needs)


def _interleaved(op: Op) -> tuple[Op, Op | None]:
    """An F&B pair as the executor interleaves it: (its F and I as one OVERLAPPED op, the W of its B, or
    None when its backward half is an I whose W the schedule places itself)."""
    f, b = op.halves()
    w = dataclasses.replace(b, kind=Kind.WEIGHT_GRAD) if b.kind == Kind.BACKWARD else None
    return dataclasses.replace(f, kind=Kind.OVERLAPPED, backward=dataclasses.replace(b, kind=Kind.INPUT_GRAD)), w


def _place(schedule: Schedule, interleave_pairs: bool) -> list[list[list[Op | None]]]:
    """[tick][rank] -> [forward-phase op, backward-phase op]: every op at the earliest phase its inputs
    and its rank's previous op allow (module docstring)."""
    num_ranks, last = schedule.num_ranks, schedule.num_stages - 1
    ready: dict = {}  # value -> (tick, phase) from which it can be used
    cursor = [(0, _FORWARD)] * num_ranks  # each rank's next free phase
    position = [0] * num_ranks
    placed: list[list[list[Op | None]]] = []
    remaining = sum(len(ops) for ops in schedule.ops)

    def put(t: int, r: int, phase: int, op: Op) -> None:
        while len(placed) <= t:
            placed.append([[None, None] for _ in range(num_ranks)])
        placed[t][r][phase] = op
        for half in op.halves():
            d, m, s = half.direction, half.microbatch, half.stage
            if half.kind == Kind.FORWARD:
                ready[("own", d, m, s)] = (t, _BACKWARD)
                ready[("act", d, m, s)] = (t + 1, _FORWARD)
            elif half.kind in (Kind.BACKWARD, Kind.INPUT_GRAD):
                # Made in a backward phase, a gradient travels during the next forward phase; made in a
                # forward phase (an interleaved pair's I), during its own tick's backward phase.
                ready[("grad", d, m, s)] = (t + 1, phase)
                if half.kind == Kind.INPUT_GRAD:
                    ready[("input_grad", d, m, s)] = (t + phase, _BACKWARD)

    while remaining:
        progressed = False
        for r in range(num_ranks):
            while position[r] < len(schedule.ops[r]):
                op = schedule.ops[r][position[r]]
                halves = op.halves()
                wanted = [_ready(h, last, ready) for h in halves]
                if None in wanted:
                    break
                fused = interleave_pairs and op.kind == Kind.OVERLAPPED
                t = cursor[r][0] + (cursor[r][1] == _BACKWARD and halves[0].kind == Kind.FORWARD)
                for half, (tick, phase) in zip(halves, wanted):
                    # A forward-phase computation (an F, an interleaved pair's I) needs its inputs by its
                    # tick's forward phase; a backward half may share a tick with inputs ready in its
                    # backward phase.
                    t = max(t, tick + (phase == _BACKWARD and (fused or half.kind == Kind.FORWARD)))
                if fused:
                    pair, w = _interleaved(op)
                    put(t, r, _FORWARD, pair)
                    if w is not None:
                        put(t, r, _BACKWARD, w)
                    cursor[r] = (t, _BACKWARD) if w is None else (t + 1, _FORWARD)
                else:
                    for half in halves:
                        put(t, r, _FORWARD if half.kind == Kind.FORWARD else _BACKWARD, half)
                    cursor[r] = (t + 1, _FORWARD) if halves[-1].kind != Kind.FORWARD else (t, _BACKWARD)
                position[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = {r: str(schedule.ops[r][position[r]]) for r in range(num_ranks)
                       if position[r] < len(schedule.ops[r])}
            raise DeadlockError(f"schedule {schedule.name!r} cannot be placed into ticks; blocked ranks: {blocked}")
    return placed


def build_plan(schedule: Schedule, interleave_pairs: bool = False) -> Plan:
    """Op table and buffer slots for `schedule` (see the module docstring); `interleave_pairs` runs every
    F&B pair's F and I as one computation."""
    placed = _place(schedule, interleave_pairs)
    num_ranks, last = schedule.num_ranks, schedule.num_stages - 1
    mpd = schedule.microbatches_per_direction
    table = np.full((len(placed), num_ranks, NUM_FIELDS), -1, np.int32)
    table[:, :, Field.F_BRANCH] = Branch.IDLE
    table[:, :, Field.B_BRANCH] = Branch.IDLE
    stash, wstash = [_Slots() for _ in range(num_ranks)], [_Slots() for _ in range(num_ranks)]
    act_in, grad_in = [_Slots() for _ in range(num_ranks)], [_Slots() for _ in range(num_ranks)]
    in_flight: dict[tuple[int, str], list] = {}  # (tick, payload) -> [(rank, field, key)] stored that tick
    channels = set()

    def send(t: int, src: int, payload: str, key: tuple, dst: int) -> None:
        """Routes a value made in tick t by rank src: activations and a pair's gradients are stored at
        the end of tick t, other gradients after the forward phase of tick t+1 (key = direction,
        micro-batch, consumer stage)."""
        when = t + 1 if payload == "grad" else t
        if dst == src:
            field = _SELF[payload]
        elif abs(dst - src) == 1:
            channels.add((payload, dst - src))
            field = CHANNELS[(payload, dst - src)]
        else:
            raise ValueError(f"{schedule.name}: rank {src} sends to rank {dst}; only neighbours are wired")
        in_flight.setdefault((when, payload), []).append((dst, field, key))

    def store(t: int, payload: str) -> None:
        for r, field, key in in_flight.pop((t, payload), []):
            table[t, r, field] = (act_in if payload == "act" else grad_in)[r].alloc(key)

    for t, row in enumerate(placed):
        for r, (op, _) in enumerate(row):  # forward phase
            if op is None:
                continue
            entry = table[t, r]
            if op.kind == Kind.OVERLAPPED:  # an interleaved pair's I (its stash is found before F allocates)
                i = op.backward
                d, m, s = i.direction, i.microbatch, i.stage
                entry[[Field.P_SLOT, Field.P_STAGE, Field.P_MB]] = i.module, s, d * mpd + m
                entry[Field.P_STASH] = stash[r].find((d, m, s))
                entry[Field.P_IN] = grad_in[r].release((d, m, s)) if s < last else -1
                entry[Field.P_WSTASH] = wstash[r].alloc((d, m, s))
                if s > 0:
                    send(t, r, "pair_grad", (d, m, s - 1), schedule.backward_destination(d, s))
            f = op.halves()[0]
            d, m, s = f.direction, f.microbatch, f.stage
            branch = Branch.PAIR if op.kind == Kind.OVERLAPPED else Branch.F
            entry[[Field.F_BRANCH, Field.F_SLOT, Field.F_STAGE, Field.F_MB]] = branch, f.module, s, d * mpd + m
            entry[Field.F_IN] = act_in[r].release((d, m, s)) if s > 0 else -1
            entry[Field.F_STASH] = stash[r].alloc((d, m, s))
            if s < last:
                send(t, r, "act", (d, m, s + 1), schedule.forward_destination(d, s))
        store(t, "grad")
        for r, (_, b) in enumerate(row):  # backward phase
            if b is None:
                continue
            d, m, s, entry = b.direction, b.microbatch, b.stage, table[t, r]
            entry[[Field.B_BRANCH, Field.B_SLOT, Field.B_STAGE, Field.B_MB]] = _BRANCH[b.kind], b.module, s, d * mpd + m
            entry[Field.B_STASH] = stash[r].find((d, m, s))
            if b.kind == Kind.WEIGHT_GRAD:
                entry[Field.B_WSTASH] = wstash[r].release((d, m, s))
                stash[r].release((d, m, s))
                continue
            entry[Field.B_IN] = grad_in[r].release((d, m, s)) if s < last else -1
            if b.kind == Kind.INPUT_GRAD:
                entry[Field.B_WSTASH] = wstash[r].alloc((d, m, s))
            else:
                stash[r].release((d, m, s))
            if s > 0:
                send(t, r, "grad", (d, m, s - 1), schedule.backward_destination(d, s))
        store(t, "act")
        store(t, "pair_grad")
    if in_flight:
        raise AssertionError(f"values arrive after the last tick: {in_flight}")
    for buffers in (stash, wstash, act_in, grad_in):
        if any(b.owner for b in buffers):
            raise AssertionError(f"{schedule.name}: buffers still hold values after the last tick")
    sizes = [max(b.size for b in buffers) for buffers in (stash, wstash, act_in, grad_in)]
    # Arrivals nobody stores go to the discard slot (index = inbox size).
    for field in Field:
        if field.name.startswith(("ACT_FROM", "GRAD_FROM", "PAIR_GRAD_FROM")):
            column = table[:, :, field]
            column[column < 0] = sizes[2] if field.name.startswith("ACT") else sizes[3]
    def used(column, every):
        return tuple(b for b in every if b == Branch.IDLE or np.any(table[:, :, column] == b))

    return Plan(schedule=schedule, phases=tuple(tuple(tuple(ops) for ops in row) for row in placed), table=table,
                forward_branches=used(Field.F_BRANCH, FORWARD_BRANCHES),
                backward_branches=used(Field.B_BRANCH, BACKWARD_BRANCHES), channels=tuple(sorted(channels)),
                num_stash=sizes[0], num_wstash=sizes[1], num_act_in=sizes[2], num_grad_in=sizes[3])
