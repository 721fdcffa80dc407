"""Cost-model simulation of a pipeline schedule: timelines, bubbles, peak activations.

Each rank runs its ops in order. An op starts as soon as the rank is free and every input it
needs is available:
  F of stage s        the activation from F of stage s-1 (same direction, same micro-batch);
  B or I of stage s   this rank's own F of stage s, and the input gradient from B/I of stage s+1;
  W of stage s        this rank's own I of stage s;
  F&B pair            the inputs of both halves; both outputs leave when the pair ends.
A value crossing ranks arrives `p2p_latency` after the op producing it ends; a hand-off inside a
rank (DualPipeV's turn of the V) is free. Sends leave as soon as their op ends: the reference
DualPipe delays a few sends to batch them with later communication, which this model ignores.

Definitions (DeepSeek-V3 report, Table 2):
  bubble of a rank      total time (first op start at 0 to last op end on any rank) minus the time
                        the rank spends computing;
  activations           counted in units of one stage's activations for one micro-batch. One unit
                        is live from the start of its F until the end of the op that last needs it:
                        B, or W when the backward is split (W still needs the stored layer inputs
                        and output gradients). An F&B pair allocates its forward's unit before its
                        backward frees one, which is the "+1" of DualPipe's PP+1;
  parameter copies      stages held per rank, in units of one stage's parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from deepseek_jax.parallel.pipeline.schedules import Kind, Op, Schedule


class DeadlockError(ValueError):
    """The schedule's dependencies cannot be satisfied in the per-rank orders it gives."""


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Durations of each op kind, and the point-to-point latency between ranks.

    Attributes:
      forward: F.
      backward: B, the full backward (input and weight gradients).
      weight_grad: W.
      input_grad: I; defaults to backward - weight_grad.
      overlapped: the F&B pair (with a full B half); defaults to forward + backward, i.e. the pair
        hides communication but not compute.
      p2p_latency: added when an activation or gradient moves to another rank.
    """

    forward: float = 1.0
    backward: float = 2.0
    weight_grad: float = 1.0
    input_grad: float | None = None
    overlapped: float | None = None
    p2p_latency: float = 0.0

    def __post_init__(self):
        if self.input_grad is None:
            object.__setattr__(self, "input_grad", self.backward - self.weight_grad)
        if self.overlapped is None:
            object.__setattr__(self, "overlapped", self.forward + self.backward)
        durations = dict(forward=self.forward, backward=self.backward, weight_grad=self.weight_grad,
                         input_grad=self.input_grad, overlapped=self.overlapped)
        for name, value in durations.items():
            if value <= 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {value} "
                                 "(input_grad defaults to backward - weight_grad)")
        if self.p2p_latency < 0:
            raise ValueError(f"CostModel.p2p_latency must be >= 0, got {self.p2p_latency}")

    @classmethod
    def unit(cls) -> CostModel:
        """Every op, the pair included, takes one tick; no latency (`tick_table`'s view)."""
        return cls(forward=1, backward=1, weight_grad=1, input_grad=1, overlapped=1)

    def duration(self, op: Op) -> float:
        if op.kind == Kind.OVERLAPPED:
            # A pair whose backward half defers W is shorter by what W would have cost inside it.
            saved = self.backward - self.input_grad if op.backward.kind == Kind.INPUT_GRAD else 0.0
            return self.overlapped - saved
        return {Kind.FORWARD: self.forward, Kind.BACKWARD: self.backward,
                Kind.INPUT_GRAD: self.input_grad, Kind.WEIGHT_GRAD: self.weight_grad}[op.kind]


@dataclasses.dataclass(frozen=True)
class TimedOp:
    op: Op
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Result of `simulate`; every per-rank tuple is indexed by rank.

    Attributes:
      schedule, cost: the inputs.
      ops: [rank] -> the rank's ops with start and end times, in execution order.
      total_time: end of the last op on any rank (the first op starts at 0).
      busy: time each rank spends computing.
      bubble: total_time - busy, the idle time of each rank.
      peak_activations: most activation units live at once on each rank (see module docstring).
      parameter_copies: stages (parameter copies) each rank holds.
    """

    schedule: Schedule
    cost: CostModel
    ops: tuple[tuple[TimedOp, ...], ...]
    total_time: float
    busy: tuple[float, ...]
    bubble: tuple[float, ...]
    peak_activations: tuple[int, ...]
    parameter_copies: tuple[int, ...]


def _needs(half: Op, num_stages: int) -> list[tuple]:
    """Keys of the values a computation consumes (see `_produces`)."""
    d, m, s = half.direction, half.microbatch, half.stage
    if half.kind == Kind.FORWARD:
        return [("act", d, m, s - 1)] if s > 0 else []
    if half.kind == Kind.WEIGHT_GRAD:
        return [("wgrad_pending", d, m, s)]
    needs = [("act", d, m, s)]  # own forward (the loss, at the last stage)
    if s < num_stages - 1:
        needs.append(("grad", d, m, s + 1))
    return needs


def _produces(half: Op) -> list[tuple]:
    d, m, s = half.direction, half.microbatch, half.stage
    return {Kind.FORWARD: [("act", d, m, s)],
            Kind.BACKWARD: [("grad", d, m, s), ("done", d, m, s)],
            Kind.INPUT_GRAD: [("grad", d, m, s), ("wgrad_pending", d, m, s)],
            Kind.WEIGHT_GRAD: [("done", d, m, s)]}[half.kind]


def _deadlock_message(schedule: Schedule, position: list[int], produced: dict) -> str:
    lines = [f"schedule {schedule.name!r} (P={schedule.num_ranks}, M={schedule.num_microbatches}) "
             "deadlocks; blocked ranks:"]
    for r, rank_ops in enumerate(schedule.ops):
        if position[r] < len(rank_ops):
            op = rank_ops[position[r]]
            missing = [k for h in op.halves() for k in _needs(h, schedule.num_stages) if k not in produced]
            lines.append(f"  rank {r} at op #{position[r]} {op} waits for "
                         + ", ".join(f"{k[0]}(direction {k[1]}, micro-batch {k[2]}, stage {k[3]})"
                                     for k in missing))
    return "\n".join(lines)


def simulate(schedule: Schedule, cost: CostModel, duration: Callable[[Op], float] | None = None) -> Timeline:
    """Runs `schedule` under `cost` (see the module docstring); raises DeadlockError if it cannot finish.
    `duration(op)`, if given, replaces `cost.duration` (e.g. measured costs that depend on the stage);
    `cost` still gives the p2p latency."""
    duration = cost.duration if duration is None else duration
    num_ranks = schedule.num_ranks
    produced: dict[tuple, tuple[float, int]] = {}  # key -> (time available on its rank, rank)
    position = [0] * num_ranks
    free_at = [0.0] * num_ranks
    timed: list[list[TimedOp]] = [[] for _ in range(num_ranks)]
    remaining = sum(len(o) for o in schedule.ops)

    def arrival(key, rank):
        when, src = produced[key]
        return when + (cost.p2p_latency if src != rank else 0.0)

    while remaining:
        progressed = False
        for r in range(num_ranks):
            while position[r] < len(schedule.ops[r]):
                op = schedule.ops[r][position[r]]
                needs = [k for h in op.halves() for k in _needs(h, schedule.num_stages)]
                if any(k not in produced for k in needs):
                    break
                start = max([free_at[r]] + [arrival(k, r) for k in needs])
                end = start + duration(op)
                for h in op.halves():
                    for key in _produces(h):
                        if key in produced:
                            raise ValueError(f"schedule {schedule.name!r}: rank {r} computes {h} "
                                             f"({key[0]}) a second time")
                        produced[key] = (end, r)
                timed[r].append(TimedOp(op, start, end))
                free_at[r] = end
                position[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise DeadlockError(_deadlock_message(schedule, position, produced))

    total = max(free_at)
    busy = tuple(sum(t.end - t.start for t in rank_ops) for rank_ops in timed)
    return Timeline(
        schedule=schedule,
        cost=cost,
        ops=tuple(tuple(t) for t in timed),
        total_time=total,
        busy=busy,
        bubble=tuple(total - b for b in busy),
        peak_activations=tuple(peak_activations(rank_ops) for rank_ops in timed),
        parameter_copies=tuple(len(held) for held in schedule.modules),
    )


def peak_activations(rank_ops: list[TimedOp]) -> int:
    """Most activation units live at once (allocated at F start, freed at the end of B or W)."""
    events = []  # (time, +1/-1); at equal times frees sort first, so back-to-back ops do not overlap
    for t in rank_ops:
        for h in t.op.halves():
            if h.kind == Kind.FORWARD:
                events.append((t.start, 1))
            elif h.kind in (Kind.BACKWARD, Kind.WEIGHT_GRAD):
                events.append((t.end, -1))
    live = peak = 0
    for _, delta in sorted(events):
        live += delta
        peak = max(peak, live)
    return peak


def tick_table(schedule: Schedule, latency: int = 0) -> tuple[tuple[Op | None, ...], ...]:
    """[tick][rank] -> the op each rank runs in one-op-per-tick lock step (None = idle).

    The executor's tables before its ticks had two phases (tables.py), kept to compare against: every
    op takes one tick; a value crossing ranks is usable `latency` ticks after the tick that produced it
    ends (0: from the next tick on, the sends after the compute; 1: sent during the next tick, in
    parallel with its compute); a hand-off inside a rank is usable from the next tick on.
    """
    cost = dataclasses.replace(CostModel.unit(), p2p_latency=float(latency))
    timeline = simulate(schedule, cost)
    table = [[None] * schedule.num_ranks for _ in range(int(timeline.total_time))]
    for r, rank_ops in enumerate(timeline.ops):
        for t in rank_ops:
            table[int(t.start)][r] = t.op
    return tuple(tuple(row) for row in table)


def tick_table_makespan(ticks: tuple[tuple[Op | None, ...], ...], cost: CostModel) -> float:
    """The time of a `tick_table` run in lock step: each tick as long as its slowest rank's op."""
    return sum(max((cost.duration(op) if op is not None else 0.0) for op in row) for row in ticks)
