"""A schedule compiled to lock-step int32 op tables and buffer slots, for the executor.

`build_plan(schedule)` turns the schedule's `tick_table` into an int32 array [ticks, ranks, fields]:
what every rank computes in every tick (which `lax.switch` branch, which module slot, stage,
micro-batch), which buffer slot each operand comes from and each result goes to, and where the
values arriving from the neighbours are stored. All schedule logic stays in schedules.py; this is
bookkeeping: it assigns buffer slots by replaying the table, in Python, once.

Buffers per rank (sizes are the maximum over ranks; every rank runs the same SPMD program):
  stash      residuals F keeps for the backward of one micro-batch, live from F to B, or to W when
             the backward is split (so its size is the simulator's peak activations, lock-step);
  wstash     the output gradients of the weight uses that I keeps for W, live from I to W;
  act_in     activations received and not yet consumed by their F;
  grad_in    gradients received and not yet consumed by their B or I.
Each inbox has one extra "discard" slot (index = its size) that arrivals nobody waits for go to.

Communication: a tick's activation (from F) and input gradient (from B or I) go right (rank r+1),
left (r-1) or to the rank itself (DualPipeV's turn). With `latency=1` the executor sends what tick t
produced during tick t+1, in parallel with tick t+1's compute, and the table is built so that no op
needs a neighbour's value earlier than that.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from deepseek_jax.parallel.pipeline.schedules import Kind, Op, Schedule
from deepseek_jax.parallel.pipeline.simulate import tick_table


class Branch(enum.IntEnum):
    """What one rank computes in one tick (the `lax.switch` index)."""

    IDLE = 0
    F = 1
    B = 2  # full backward
    I = 3  # noqa: E741  input-gradient backward; its W runs later
    W = 4
    FB = 5  # overlapped pair: F of one micro-batch and B of another
    FI = 6  # overlapped pair with an I backward half


class Field(enum.IntEnum):
    """Columns of the op table. F_* describe the forward half; B_* the backward half (B or I) or W."""

    BRANCH = 0
    F_SLOT = 1  # local module slot
    F_STAGE = 2  # global stage
    F_MB = 3  # micro-batch index into the inputs (direction * per-direction count + micro-batch)
    F_IN = 4  # act_in slot holding the input activation; -1 at stage 0
    F_STASH = 5  # stash slot the residuals go to
    B_SLOT = 6
    B_STAGE = 7
    B_MB = 8
    B_IN = 9  # grad_in slot holding the output gradient; -1 at the last stage
    B_STASH = 10  # stash slot with this micro-batch's residuals
    B_WSTASH = 11  # wstash slot I writes / W reads
    ACT_FROM_LEFT = 12  # act_in slot for the activation arriving from rank r-1 (discard slot if none)
    ACT_FROM_RIGHT = 13
    GRAD_FROM_LEFT = 14
    GRAD_FROM_RIGHT = 15
    ACT_FROM_SELF = 16  # act_in slot for this tick's own activation (DualPipeV's turn)
    GRAD_FROM_SELF = 17


NUM_FIELDS = len(Field)

# Channels: (payload, direction of travel) -> the field where the receiver stores it.
CHANNELS = {("act", +1): Field.ACT_FROM_LEFT, ("act", -1): Field.ACT_FROM_RIGHT,
            ("grad", +1): Field.GRAD_FROM_LEFT, ("grad", -1): Field.GRAD_FROM_RIGHT}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A schedule ready to execute.

    Attributes:
      schedule: the schedule.
      latency: ticks a value takes to reach a neighbour (see the module docstring).
      table: int32 [ticks, ranks, NUM_FIELDS].
      branches: the branches the table uses (others are not compiled).
      channels: the (payload, +1 right / -1 left) point-to-point channels the schedule uses.
      num_stash, num_wstash, num_act_in, num_grad_in: buffer slots per rank (inboxes without the
        discard slot).
    """

    schedule: Schedule
    latency: int
    table: np.ndarray
    branches: tuple[Branch, ...]
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


def _branch(op: Op) -> Branch:
    if op.kind == Kind.OVERLAPPED:
        return Branch.FB if op.backward.kind == Kind.BACKWARD else Branch.FI
    return {Kind.FORWARD: Branch.F, Kind.BACKWARD: Branch.B, Kind.INPUT_GRAD: Branch.I,
            Kind.WEIGHT_GRAD: Branch.W}[op.kind]


def build_plan(schedule: Schedule, latency: int = 1) -> Plan:
    """Op table and buffer slots for `schedule` (see the module docstring)."""
    if latency not in (0, 1):
        raise ValueError(f"latency must be 0 (send after compute) or 1 (send during the next tick), "
                         f"got {latency}")
    ticks = tick_table(schedule, latency)
    num_ranks, last = schedule.num_ranks, schedule.num_stages - 1
    mpd = schedule.microbatches_per_direction
    table = np.full((len(ticks), num_ranks, NUM_FIELDS), -1, np.int32)
    table[:, :, Field.BRANCH] = Branch.IDLE
    stash = [_Slots() for _ in range(num_ranks)]
    wstash = [_Slots() for _ in range(num_ranks)]
    act_in = [_Slots() for _ in range(num_ranks)]
    grad_in = [_Slots() for _ in range(num_ranks)]
    arrivals: dict[int, list] = {}  # tick -> [(rank, field, payload, key)]
    channels = set()

    def send(t: int, src: int, payload: str, key: tuple, dst: int) -> None:
        """Route a value produced at tick t by rank src; key = (direction, micro-batch, consumer stage)."""
        if dst == src:
            field = Field.ACT_FROM_SELF if payload == "act" else Field.GRAD_FROM_SELF
            arrivals.setdefault(t, []).append((dst, field, payload, key))
            return
        if abs(dst - src) != 1:
            raise ValueError(f"{schedule.name}: rank {src} sends to rank {dst}; only neighbours are wired")
        channels.add((payload, dst - src))
        arrivals.setdefault(t + latency, []).append((dst, CHANNELS[(payload, dst - src)], payload, key))

    for t, row in enumerate(ticks):
        for r, op in enumerate(row):
            if op is None:
                continue
            entry = table[t, r]
            entry[Field.BRANCH] = _branch(op)
            for half in op.halves():  # F first: a pair allocates its stash slot before freeing one
                d, m, s, k = half.direction, half.microbatch, half.stage, half.module
                key = (d, m, s)
                if half.kind == Kind.FORWARD:
                    entry[[Field.F_SLOT, Field.F_STAGE, Field.F_MB]] = k, s, d * mpd + m
                    entry[Field.F_IN] = act_in[r].release(key) if s > 0 else -1
                    entry[Field.F_STASH] = stash[r].alloc(key)
                    if s < last:
                        send(t, r, "act", (d, m, s + 1), schedule.forward_destination(d, s))
                    continue
                entry[[Field.B_SLOT, Field.B_STAGE, Field.B_MB]] = k, s, d * mpd + m
                entry[Field.B_STASH] = stash[r].find(key)
                if half.kind == Kind.WEIGHT_GRAD:
                    entry[Field.B_WSTASH] = wstash[r].release(key)
                    stash[r].release(key)
                    continue
                entry[Field.B_IN] = grad_in[r].release(key) if s < last else -1
                if half.kind == Kind.INPUT_GRAD:
                    entry[Field.B_WSTASH] = wstash[r].alloc(key)
                else:
                    stash[r].release(key)
                if s > 0:
                    send(t, r, "grad", (d, m, s - 1), schedule.backward_destination(d, s))
        # Values arriving at the end of tick t (consumed from tick t+1 on): after this tick's reads.
        for r, field, payload, key in arrivals.pop(t, []):
            table[t, r, field] = (act_in if payload == "act" else grad_in)[r].alloc(key)
    if arrivals:
        raise AssertionError(f"values arrive after the last tick: {arrivals}")
    for buffers in (stash, wstash, act_in, grad_in):
        if any(b.owner for b in buffers):
            raise AssertionError(f"{schedule.name}: buffers still hold values after the last tick")
    sizes = [max(b.size for b in buffers) for buffers in (stash, wstash, act_in, grad_in)]
    # Arrivals nobody stores go to the discard slot (index = inbox size).
    for field, size in ((Field.ACT_FROM_LEFT, sizes[2]), (Field.ACT_FROM_RIGHT, sizes[2]),
                        (Field.ACT_FROM_SELF, sizes[2]), (Field.GRAD_FROM_LEFT, sizes[3]),
                        (Field.GRAD_FROM_RIGHT, sizes[3]), (Field.GRAD_FROM_SELF, sizes[3])):
        column = table[:, :, field]
        column[column < 0] = size
    used = sorted({Branch(b) for b in np.unique(table[:, :, Field.BRANCH])} | {Branch.IDLE})
    return Plan(schedule=schedule, latency=latency, table=table, branches=tuple(used),
                channels=tuple(sorted(channels)), num_stash=sizes[0], num_wstash=sizes[1],
                num_act_in=sizes[2], num_grad_in=sizes[3])
