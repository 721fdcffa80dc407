"""Tests for pipeline schedules: completeness, dependencies, symmetry, reference identity, errors, CLI.

tests/data/dualpipe_reference_traces.json holds the op traces of DeepSeek's reference implementation
(github.com/deepseek-ai/DualPipe, dualpipe/dualpipe.py and dualpipe/dualpipev.py, at commit
3da1bbea53606543d7f5f232338fc58096db30e3; the commit is also stored in the file). They were recorded
outside this repository by importing the reference package with stand-ins for torch, autograd and
torch.distributed and calling `DualPipe.step` / `DualPipeV.step` once per rank: the module call
records F, autograd's backward records B (or I plus a deferred W closure when the reference enables
its WeightGradStore), `overlapped_forward_backward` records the pair, and the p2p helpers record the
destination of every send. Everything else — the eight steps, the chunk counters and the real
WeightGradStore FIFO — is the reference's own code. Micro-batch ids of backwards are read from tags
on the tensors the reference passes to backward, not inferred. With `overlapped_forward_backward`
absent the reference runs each pair as F then B; the recorder checked that this gives the same order.
"""

import collections
import json
import os
import subprocess
import sys

import pytest

from deepseek_jax.parallel.pipeline import schedules
from deepseek_jax.parallel.pipeline.schedules import Kind, Op
from deepseek_jax.parallel.pipeline.simulate import CostModel, simulate

TRACES = os.path.join(os.path.dirname(__file__), "data", "dualpipe_reference_traces.json")


def _cases():
    for p in (2, 4, 8):
        for m in sorted({1, p - 1, p, 2 * p + 3} - {0}):
            for name in ("gpipe", "1f1b", "zb_h1"):
                yield name, p, m
        for m in (2 * p, 2 * p + 2, 4 * p):
            yield "dualpipe", p, m
    for p in (2, 3, 4, 8):
        for m in (2 * p, 2 * p + 1, 3 * p):
            yield "dualpipev", p, m


CASES = list(_cases())


def _computations(schedule):
    """(rank, index in the rank's list, half) for every computation, pairs split into halves."""
    return [(r, i, h) for r, rank_ops in enumerate(schedule.ops) for i, op in enumerate(rank_ops)
            for h in op.halves()]


@pytest.mark.parametrize("name,p,m", CASES)
def test_every_microbatch_runs_once_per_stage(name, p, m):
    schedule = schedules.make_schedule(name, p, m)
    assert schedule.num_directions * schedule.microbatches_per_direction == m
    where = collections.defaultdict(list)  # (kind, d, m, s) -> [(rank, index)]
    for r, i, h in _computations(schedule):
        assert schedule.rank_of(h.direction, h.stage) == r
        assert schedule.modules[r][h.module] == h.stage
        where[(h.kind, h.direction, h.microbatch, h.stage)].append((r, i))
    for d in range(schedule.num_directions):
        for mb in range(schedule.microbatches_per_direction):
            for s in range(schedule.num_stages):
                forward = where.pop((Kind.FORWARD, d, mb, s))
                full = where.pop((Kind.BACKWARD, d, mb, s), [])
                split = where.pop((Kind.INPUT_GRAD, d, mb, s), [])
                weight = where.pop((Kind.WEIGHT_GRAD, d, mb, s), [])
                assert len(forward) == 1 and len(full) + len(split) == 1, (d, mb, s)
                assert len(weight) == len(split), (d, mb, s)
                backward = (full + split)[0]
                assert forward[0] < backward  # same rank, F earlier in its list
                if split:
                    assert split[0] < weight[0]  # W after its I
    assert not where, f"ops outside the micro-batch/stage grid: {sorted(where)[:5]}"


# What each computation hands on: F an activation, B and I an input gradient (G), I a pending W.
_PRODUCES = {Kind.FORWARD: "F", Kind.BACKWARD: "G", Kind.INPUT_GRAD: "GI", Kind.WEIGHT_GRAD: ""}


@pytest.mark.parametrize("name,p,m", CASES)
def test_simulated_timeline_respects_dependencies(name, p, m):
    schedule = schedules.make_schedule(name, p, m)
    latency = 0.25
    timeline = simulate(schedule, CostModel(forward=1, backward=2, weight_grad=1, overlapped=2.5,
                                            p2p_latency=latency))
    end, rank_of = {}, {}  # ("F"|"G"|"I", direction, micro-batch, stage) -> end time, rank
    for r, rank_ops in enumerate(timeline.ops):
        assert [t.op for t in rank_ops] == list(schedule.ops[r])
        for before, after in zip(rank_ops, rank_ops[1:]):
            assert before.end <= after.start
        for t in rank_ops:
            for h in t.op.halves():
                for tag in _PRODUCES[h.kind]:
                    key = (tag, h.direction, h.microbatch, h.stage)
                    end[key], rank_of[key] = t.end, r

    for r, rank_ops in enumerate(timeline.ops):
        for t in rank_ops:
            for h in t.op.halves():
                d, mb, s = h.direction, h.microbatch, h.stage
                if h.kind == Kind.FORWARD:
                    needs = [("F", d, mb, s - 1)] if s > 0 else []
                elif h.kind == Kind.WEIGHT_GRAD:
                    needs = [("I", d, mb, s)]
                else:  # own forward, and the gradient from stage s+1
                    needs = [("F", d, mb, s)] + ([("G", d, mb, s + 1)] if s + 1 < schedule.num_stages else [])
                for key in needs:
                    arrival = end[key] + (latency if rank_of[key] != r else 0)
                    assert t.start >= arrival - 1e-9, (h, key)


@pytest.mark.parametrize("p", [2, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 2, 6])
def test_dualpipe_rank_mirrors_its_partner(p, extra):
    schedule = schedules.dualpipe(p, 2 * p + extra)

    def mirror(op):
        backward = None if op.backward is None else mirror(op.backward)
        return Op(op.kind, op.microbatch, 1 - op.direction, op.stage, 1 - op.module, backward)

    for r in range(p):
        assert schedule.ops[p - 1 - r] == tuple(mirror(op) for op in schedule.ops[r])


def _reference_cases():
    with open(TRACES) as f:
        data = json.load(f)
    return [pytest.param(kind, e, id=f"{kind}-P{e['ranks']}-M{e['microbatches']}")
            for kind, entries in data["traces"].items() for e in entries]


@pytest.mark.parametrize("kind,entry", _reference_cases())
def test_matches_deepseek_reference_op_for_op(kind, entry):
    schedule = schedules.make_schedule(kind, entry["ranks"], entry["microbatches"])
    assert [" ".join(map(str, rank_ops)) for rank_ops in schedule.ops] == entry["ops"]
    # Placement: every send the reference posts goes where our placement says.
    for r, rank_ops in enumerate(schedule.ops):
        sends = collections.Counter()
        for op in rank_ops:
            for h in op.halves():
                if h.kind == Kind.FORWARD:
                    dst = schedule.forward_destination(h.direction, h.stage)
                elif h.kind in (Kind.BACKWARD, Kind.INPUT_GRAD):
                    dst = schedule.backward_destination(h.direction, h.stage)
                else:
                    dst = None
                if dst is not None and dst != r:
                    sends[str(dst)] += 1
        assert dict(sends) == entry["sends"][r], r


def test_reference_traces_cover_the_brief():
    with open(TRACES) as f:
        traces = json.load(f)["traces"]
    assert {e["ranks"] for e in traces["dualpipe"]} == {2, 4, 6, 8}
    assert {e["ranks"] for e in traces["dualpipev"]} == {2, 3, 4, 8}
    assert (8, 20) in {(e["ranks"], e["microbatches"]) for e in traces["dualpipe"]}


@pytest.mark.parametrize("name,p,m,message", [
    ("gpipe", 1, 4, "at least 2 pipeline ranks"),
    ("1f1b", 0, 4, "at least 2 pipeline ranks"),
    ("zb_h1", 4, 0, "at least 1 micro-batch"),
    ("dualpipe", 5, 10, "even number of ranks"),
    ("dualpipe", 4, 6, "at least 2\\*num_ranks=8"),
    ("dualpipe", 4, 9, "even number of micro-batches"),
    ("dualpipe", 1, 2, "at least 2 pipeline ranks"),
    ("dualpipev", 4, 7, "at least 2\\*num_ranks=8"),
    ("dualpipev", 1, 4, "at least 2 pipeline ranks"),
    ("interleaved", 4, 8, "unknown schedule"),
])
def test_invalid_arguments_raise_helpful_errors(name, p, m, message):
    with pytest.raises(ValueError, match=message):
        schedules.make_schedule(name, p, m)


def test_error_suggests_a_fix():
    with pytest.raises(ValueError, match="use num_microbatches=8"):
        schedules.dualpipe(4, 5)
    with pytest.raises(ValueError, match="use 4 ranks"):
        schedules.dualpipe(3, 12)


def test_schedule_rejects_misplaced_ops():
    good = schedules.one_f_one_b(2, 2)
    with pytest.raises(ValueError, match="placed on rank 1"):
        schedules.Schedule("bad", 2, 2, 2, good.placement, good.modules,
                           (good.ops[0] + (Op(Kind.FORWARD, 0, 0, 1, 0),), good.ops[1]))


def test_op_text_format():
    pair = Op(Kind.OVERLAPPED, 3, 0, 2, 0, backward=Op(Kind.BACKWARD, 1, 1, 5, 1))
    ops = (Op(Kind.FORWARD, 3, 0, 2, 0), Op(Kind.INPUT_GRAD, 2, 1, 0, 1), Op(Kind.WEIGHT_GRAD, 2, 1, 0, 1),
           pair)
    assert [str(o) for o in ops] == ["F0.3", "I1.2", "W1.2", "[F0.3|B1.1]"]
    assert pair.halves() == (Op(Kind.FORWARD, 3, 0, 2, 0), Op(Kind.BACKWARD, 1, 1, 5, 1))


def test_format_schedule():
    assert schedules.format_schedule(schedules.one_f_one_b(2, 3)) == (
        "rank 0: F0.0 F0.1 B0.0 F0.2 B0.1 B0.2\n"
        "rank 1: F0.0 B0.0 F0.1 B0.1 F0.2 B0.2")
    assert schedules.format_schedule(schedules.dualpipe(2, 4)).splitlines()[0] == (
        "rank 0: F0.0 F1.0 F0.1 B1.0 [F1.1|B0.0] B1.1 I0.1 W0.1")


def test_cli_prints_one_line_per_rank(tmp_path):
    png = tmp_path / "dualpipev.png"
    result = subprocess.run(
        [sys.executable, "-m", "deepseek_jax.parallel.pipeline", "--schedule=dualpipev",
         "--ranks=2", "--microbatches=4", f"--plot={png}"],
        capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"rank {r}: " + " ".join(map(str, ops))
                         for r, ops in enumerate(schedules.dualpipev(2, 4).ops)]
    assert lines[0].startswith("rank 0: F0.0 F0.1 F0.2 F1.0 I1.0 W1.0 F1.1 [F0.3|B1.1]")
    assert png.stat().st_size > 1000
