"""Pipeline schedules as data: GPipe, 1F1B, ZB-H1, DualPipe and DualPipeV.

A `Schedule` lists, for every pipeline rank, the ordered compute ops the rank runs in one training
step, together with an explicit placement (which rank computes which stage of which direction, and
which local module slot holds it). The simulator, the plot, the text printer and the executor all
consume this one value; no schedule logic lives anywhere else.

Legend: P ranks, M micro-batches per step (both directions together), S stages in the model chain,
d direction (0 or 1), m micro-batch id within its direction, s global stage, k local module slot.

Op kinds (DeepSeek-V3 report, Table 2 and Figure 5):
  F   forward of one stage for one micro-batch
  B   full backward (input gradient and weight gradient together)
  I   backward for the input only; its weight gradient is deferred to a later W
  W   the deferred weight gradient of the oldest pending I on this rank (FIFO)
  FB  a forward and a backward of two different micro-batches run as one overlapped op (F&B)

Text format (one op): `F0.3` forward on module slot 0 of micro-batch 3; `B1.2`, `I1.2`, `W1.2`
likewise; `[F0.3|B1.1]` the overlapped pair. For every schedule here the module slot equals the
direction, except DualPipeV whose single direction runs down (slot 0) and back up (slot 1) the V.

Run `python -m deepseek_jax.parallel.pipeline --schedule=dualpipe --ranks=8 --microbatches=20
[--plot=out.png]` to print a schedule (and draw it).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable


class Kind(enum.StrEnum):
    """What an op computes."""

    FORWARD = "F"
    BACKWARD = "B"
    INPUT_GRAD = "I"
    WEIGHT_GRAD = "W"
    OVERLAPPED = "FB"


@dataclasses.dataclass(frozen=True)
class Op:
    """One compute op on one rank.

    Attributes:
      kind: what the op computes.
      microbatch: micro-batch id within its direction, 0 .. Schedule.microbatches_per_direction - 1.
      direction: which stream of micro-batches (index into `Schedule.placement`).
      stage: the global stage computed, 0 .. Schedule.num_stages - 1.
      module: the local module slot used: `Schedule.modules[rank][module] == stage`.
      backward: OVERLAPPED only — the backward half (kind B or I); the fields above then describe
        the forward half.
    """

    kind: Kind
    microbatch: int
    direction: int
    stage: int
    module: int
    backward: Op | None = None

    def __post_init__(self):
        if (self.kind == Kind.OVERLAPPED) != (self.backward is not None):
            raise ValueError(f"only an OVERLAPPED op has a backward half: {self!r}")
        if self.backward is not None and self.backward.kind not in (Kind.BACKWARD, Kind.INPUT_GRAD):
            raise ValueError(f"the backward half of a pair must be B or I, got {self.backward.kind}")

    def halves(self) -> tuple[Op, ...]:
        """The computations this op performs: (F, B-or-I) for a pair, else (self,)."""
        if self.backward is None:
            return (self,)
        return (dataclasses.replace(self, kind=Kind.FORWARD, backward=None), self.backward)

    def __str__(self) -> str:
        if self.backward is not None:
            return f"[{self.halves()[0]}|{self.backward}]"
        return f"{self.kind.value}{self.module}.{self.microbatch}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank op lists plus explicit placement.

    Attributes:
      name: schedule name (a key of `SCHEDULES`).
      num_ranks: P, pipeline ranks.
      num_microbatches: M, micro-batches per training step over all directions.
      num_stages: S, stages in the model chain one micro-batch passes through.
      placement: [direction][stage] -> rank computing that stage for that direction.
      modules: [rank][slot] -> stage held in that local module slot (parameter copy).
      ops: [rank] -> ops in execution order.
    """

    name: str
    num_ranks: int
    num_microbatches: int
    num_stages: int
    placement: tuple[tuple[int, ...], ...]
    modules: tuple[tuple[int, ...], ...]
    ops: tuple[tuple[Op, ...], ...]

    def __post_init__(self):
        if len(self.modules) != self.num_ranks or len(self.ops) != self.num_ranks:
            raise ValueError(f"{self.name}: modules and ops need one entry per rank ({self.num_ranks})")
        for direction, ranks in enumerate(self.placement):
            if len(ranks) != self.num_stages:
                raise ValueError(f"{self.name}: placement[{direction}] must list {self.num_stages} ranks")
        for rank, rank_ops in enumerate(self.ops):
            for op in rank_ops:
                for half in op.halves():
                    if self.placement[half.direction][half.stage] != rank:
                        raise ValueError(f"{self.name}: rank {rank} runs {half} of stage {half.stage}, "
                                         f"placed on rank {self.placement[half.direction][half.stage]}")
                    if self.modules[rank][half.module] != half.stage:
                        raise ValueError(f"{self.name}: rank {rank} slot {half.module} holds stage "
                                         f"{self.modules[rank][half.module]}, not {half.stage}")

    @property
    def num_directions(self) -> int:
        return len(self.placement)

    @property
    def microbatches_per_direction(self) -> int:
        return self.num_microbatches // self.num_directions

    def rank_of(self, direction: int, stage: int) -> int:
        """The rank that computes `stage` for micro-batches of `direction`."""
        return self.placement[direction][stage]

    def forward_destination(self, direction: int, stage: int) -> int | None:
        """Rank receiving the activation F of `stage` produces (maybe itself); None after the last stage."""
        return None if stage == self.num_stages - 1 else self.placement[direction][stage + 1]

    def backward_destination(self, direction: int, stage: int) -> int | None:
        """Rank receiving the input gradient B/I of `stage` produces (maybe itself); None for stage 0."""
        return None if stage == 0 else self.placement[direction][stage - 1]

    def copies(self, stage: int) -> tuple[tuple[int, int], ...]:
        """(rank, slot) of every parameter copy of `stage`; their gradients are summed before the update."""
        return tuple((r, k) for r, held in enumerate(self.modules) for k, s in enumerate(held) if s == stage)


# ---------------------------------------------------------------------------------------------------
# Single-direction schedules: rank r holds stage r.


def _check_common(name: str, num_ranks: int, num_microbatches: int) -> None:
    if num_ranks < 2:
        raise ValueError(f"{name} needs at least 2 pipeline ranks, got num_ranks={num_ranks}; "
                         "with one rank run the model without a pipeline")
    if num_microbatches < 1:
        raise ValueError(f"{name} needs at least 1 micro-batch, got num_microbatches={num_microbatches}")


def _linear_schedule(name: str, num_ranks: int, num_microbatches: int,
                     program: Callable[[int], list[tuple[Kind, int]]]) -> Schedule:
    """Builds a schedule where rank r holds stage r; `program(r)` yields (kind, micro-batch) pairs."""
    ops = tuple(tuple(Op(kind, m, 0, r, 0) for kind, m in program(r)) for r in range(num_ranks))
    return Schedule(name, num_ranks, num_microbatches, num_ranks, (tuple(range(num_ranks)),),
                    tuple((r,) for r in range(num_ranks)), ops)


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards (in micro-batch order)."""
    _check_common("gpipe", num_ranks, num_microbatches)

    def program(r):
        return [(Kind.FORWARD, m) for m in range(num_microbatches)] + [(Kind.BACKWARD, m)
                                                                       for m in range(num_microbatches)]

    return _linear_schedule("gpipe", num_ranks, num_microbatches, program)


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): P-1-r warm-up forwards, then alternate F and B, then drain the Bs."""
    _check_common("1f1b", num_ranks, num_microbatches)

    def program(r):
        warmup = min(num_ranks - 1 - r, num_microbatches)
        out = [(Kind.FORWARD, m) for m in range(warmup)]
        for m in range(warmup, num_microbatches):
            out += [(Kind.FORWARD, m), (Kind.BACKWARD, m - warmup)]
        out += [(Kind.BACKWARD, m) for m in range(num_microbatches - warmup, num_microbatches)]
        return out

    return _linear_schedule("1f1b", num_ranks, num_microbatches, program)


def zb_h1(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with B split into I and W.

    Rank r keeps 1F1B's P-1-r warm-up forwards, then defers the W of its first r backwards; those
    r Ws run at the very end, where 1F1B leaves rank r idle for r backward slots. Every rank then
    holds at most P micro-batches' activations (counting until W), the peak of 1F1B's rank 0.
    Rank 0's input gradient has no consumer, so it runs full Bs.
    """
    _check_common("zb_h1", num_ranks, num_microbatches)

    def program(r):
        warmup = min(num_ranks - 1 - r, num_microbatches)
        out = [(Kind.FORWARD, m) for m in range(warmup)]
        pending = collections.deque()
        forward, backward = warmup, 0

        def backward_op():
            nonlocal backward
            if r == 0:
                out.append((Kind.BACKWARD, backward))
            else:
                out.append((Kind.INPUT_GRAD, backward))
                pending.append(backward)
            backward += 1

        while forward < num_microbatches:
            out.append((Kind.FORWARD, forward))
            forward += 1
            backward_op()
            if len(pending) > r:
                out.append((Kind.WEIGHT_GRAD, pending.popleft()))
        while backward < num_microbatches:
            backward_op()
            if len(pending) > r:
                out.append((Kind.WEIGHT_GRAD, pending.popleft()))
        out += [(Kind.WEIGHT_GRAD, m) for m in pending]
        return out

    return _linear_schedule("zb_h1", num_ranks, num_microbatches, program)


# ---------------------------------------------------------------------------------------------------
# DualPipe and DualPipeV: two module slots per rank, eight steps per rank (DeepSeek-V3, Section 3.2.1).


class _DualRank:
    """Builds one rank's op list in terms of its two local phases (0 and 1).

    Micro-batch ids are counted per phase in order, and W pops the oldest deferred I (FIFO),
    as in DeepSeek's reference implementation.
    """

    def __init__(self, make_op: Callable[[Kind, int, int], Op]):
        self._make_op = make_op  # (kind, phase, micro-batch) -> Op
        self._next_f = [0, 0]
        self._next_b = [0, 0]
        self._deferred = collections.deque()
        self.ops: list[Op] = []

    def _forward(self, phase: int) -> Op:
        self._next_f[phase] += 1
        return self._make_op(Kind.FORWARD, phase, self._next_f[phase] - 1)

    def _backward(self, phase: int, defer_w: bool) -> Op:
        self._next_b[phase] += 1
        op = self._make_op(Kind.INPUT_GRAD if defer_w else Kind.BACKWARD, phase, self._next_b[phase] - 1)
        if defer_w:
            self._deferred.append(op)
        return op

    def f(self, phase: int) -> None:
        self.ops.append(self._forward(phase))

    def b(self, phase: int, defer_w: bool = False) -> None:
        self.ops.append(self._backward(phase, defer_w))

    def w(self) -> None:
        op = self._deferred.popleft()
        self.ops.append(dataclasses.replace(op, kind=Kind.WEIGHT_GRAD))

    def fb(self, f_phase: int, b_phase: int) -> None:
        f = self._forward(f_phase)
        self.ops.append(dataclasses.replace(f, kind=Kind.OVERLAPPED, backward=self._backward(b_phase, False)))


def _dual_rank_ops(half: int, h: int, chunks: int, is_turn: bool,
                   make_op: Callable[[Kind, int, int], Op]) -> list[Op]:
    """The eight DualPipe steps for one rank.

    Args:
      half: ranks on one side of the pipe's middle (DualPipe: P/2; DualPipeV: P).
      h: distance of this rank from its end of the pipe (DualPipe: min(r, P-1-r); DualPipeV: r).
      chunks: micro-batches per phase (DualPipe: M/2; DualPipeV: M).
      is_turn: this rank sits where the two phases meet (DualPipe: the two middle ranks;
        DualPipeV: the last rank, where the V turns).
      make_op: (kind, phase, micro-batch) -> Op.
    """
    rank = _DualRank(make_op)
    edge = half - h - 1  # ranks between this one and the middle/turn
    for _ in range(2 * edge):  # 1: forwards of phase 0 fill the pipe
        rank.f(0)
    for _ in range(h + 1):  # 2: forwards of both phases
        rank.f(0)
        rank.f(1)
    for _ in range(edge):  # 3: split backwards: the input gradient leaves before W runs
        rank.b(1, defer_w=True)
        rank.w()
        rank.f(1)
    for i in range(chunks - 2 * half + h + 1):  # 4: steady state, two overlapped pairs
        if i == 0 and is_turn:
            # The reference does not overlap these two: the forward fills the wait for the backward.
            rank.f(0)
            rank.b(1)
        else:
            rank.fb(0, 1)
        rank.fb(1, 0)
    for _ in range(edge):  # 5: phase-0 forwards are exhausted
        rank.b(1)
        rank.fb(1, 0)
    # 6: backwards of both phases; the second half of these 2(h+1) defer W, so that exactly h+1
    # Ws remain for step 8 to fill the tail bubble.
    for j in range(2 * (h + 1)):
        rank.b(1 - j % 2, defer_w=j >= h + 1)
    for _ in range(edge):  # 7
        rank.w()
        rank.b(0, defer_w=True)
    for _ in range(h + 1):  # 8: drain the deferred Ws
        rank.w()
    return rank.ops


def dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe: micro-batches enter from both ends; rank i holds stages i and P-1-i.

    Direction 0 runs stage s on rank s, direction 1 runs stage s on rank P-1-s; each direction
    gets M/2 micro-batches. Rank r's local phase p is direction p for the first half of the ranks
    and direction 1-p for the second half, which makes rank P-1-r the mirror of rank r.
    Op-for-op identical to deepseek-ai/DualPipe `dualpipe.py`.
    """
    p, m = num_ranks, num_microbatches
    _check_common("dualpipe", p, m)
    if p % 2:
        raise ValueError(f"dualpipe needs an even number of ranks (rank i pairs with rank P-1-i), got "
                         f"num_ranks={p}; use {p + 1} ranks, or dualpipev which takes any number")
    if m % 2 or m < 2 * p:
        raise ValueError(f"dualpipe needs an even number of micro-batches (split between the two "
                         f"directions) of at least 2*num_ranks={2 * p}, got num_microbatches={m}; "
                         f"use num_microbatches={max(2 * p, m + m % 2)}")
    ops = []
    for r in range(p):
        second_half = int(r >= p // 2)

        def make_op(kind, phase, mb, r=r, second_half=second_half):
            d = phase ^ second_half
            return Op(kind, mb, d, r if d == 0 else p - 1 - r, d)

        ops.append(tuple(_dual_rank_ops(p // 2, min(r, p - 1 - r), m // 2, min(r, p - 1 - r) == p // 2 - 1,
                                        make_op)))
    placement = (tuple(range(p)), tuple(reversed(range(p))))
    return Schedule("dualpipe", p, m, p, placement, tuple((r, p - 1 - r) for r in range(p)), tuple(ops))


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): P ranks run 2P stages in a V.

    Rank i holds stage i (slot 0, on the way down) and stage 2P-1-i (slot 1, on the way back up);
    the last rank hands stage P-1's output to its own stage P. One direction, M micro-batches.
    Op-for-op identical to deepseek-ai/DualPipe `dualpipev.py`.
    """
    p, m = num_ranks, num_microbatches
    _check_common("dualpipev", p, m)
    if m < 2 * p:
        raise ValueError(f"dualpipev needs at least 2*num_ranks={2 * p} micro-batches, got "
                         f"num_microbatches={m}; use num_microbatches>={2 * p}")
    ops = []
    for r in range(p):
        def make_op(kind, phase, mb, r=r):
            return Op(kind, mb, 0, r if phase == 0 else 2 * p - 1 - r, phase)

        ops.append(tuple(_dual_rank_ops(p, r, m, r == p - 1, make_op)))
    placement = (tuple(range(p)) + tuple(reversed(range(p))),)
    return Schedule("dualpipev", p, m, 2 * p, placement, tuple((r, 2 * p - 1 - r) for r in range(p)),
                    tuple(ops))


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "zb_h1": zb_h1,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def make_schedule(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """Looks up `name` in `SCHEDULES` and builds it."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_ranks, num_microbatches)


def format_schedule(schedule: Schedule) -> str:
    """One line per rank: `rank 0: F0.0 F0.1 ... [F0.7|B1.3] ... W0.9`."""
    width = len(str(schedule.num_ranks - 1))
    return "\n".join(f"rank {r:>{width}}: " + " ".join(map(str, rank_ops))
                     for r, rank_ops in enumerate(schedule.ops))
