"""Tests for the cost-model simulator: closed-form bubbles (DeepSeek-V3 Table 2), memory, deadlocks.

Where Table 2's closed forms are exact under our simulator (found by sweeping cost ratios):
  GPipe, 1F1B  (P-1)(F+B) for every cost ratio and every rank; p2p latency adds 2(P-1) latencies.
  ZB-H1        (P-1)(F+B-2W) for every rank when W <= F. With W > F the deferred Ws overflow the
               tail bubbles they are meant to fill, and the form is optimistic.
  DualPipe(V)  (PP/2-1)(F&B+B-3W), for the worst rank, when I = F (the input-only backward costs as
               much as a forward, as Figure 5 draws them), W <= F and F&B <= F+B. Ranks that run
               fewer overlapped pairs have less bubble when F&B < F+B. With I != F the form is off in
               both directions (I > F: the simulation is better; I < F: worse).
"""

import pytest

from deepseek_jax.parallel.pipeline import plot, schedules
from deepseek_jax.parallel.pipeline.schedules import Kind, Op, Schedule
from deepseek_jax.parallel.pipeline.simulate import CostModel, DeadlockError, simulate, tick_table


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m_of_p", [lambda p: 1, lambda p: p, lambda p: 2 * p + 3])
@pytest.mark.parametrize("f,b", [(1, 1), (1, 2), (2, 3)])
def test_gpipe_and_1f1b_bubble_is_exact(name, p, m_of_p, f, b):
    m = m_of_p(p)
    cost = CostModel(forward=f, backward=b, weight_grad=b / 2)
    timeline = simulate(schedules.make_schedule(name, p, m), cost)
    assert timeline.total_time == (m + p - 1) * (f + b)
    assert all(bubble == (p - 1) * (f + b) for bubble in timeline.bubble)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_p2p_latency_adds_to_the_critical_path(p):
    m, latency = 2 * p, 0.5
    ideal = (m + p - 1) * 3 + 2 * (p - 1) * latency  # one trip down and one back up
    gpipe = simulate(schedules.gpipe(p, m), CostModel(p2p_latency=latency))
    assert gpipe.total_time == ideal
    # 1F1B's steady state waits for neighbour round trips, so latency costs it more than that.
    one_f_one_b = simulate(schedules.one_f_one_b(p, m), CostModel(p2p_latency=latency))
    assert one_f_one_b.total_time > ideal


@pytest.mark.parametrize("m", [1, 3, 8])
def test_stage_dependent_durations_make_the_slow_stage_the_bottleneck(m):
    """GPipe on 2 ranks with the last stage twice as slow (e.g. the output head): every F must pass stage
    1, whose M forwards and then M backwards run back to back, so the makespan is F0 + M F1 + M B1 + B0."""
    f, b = {0: 1.0, 1: 2.0}, {0: 1.5, 1: 3.0}
    timeline = simulate(schedules.gpipe(2, m), CostModel(),
                        duration=lambda op: (f if op.kind == Kind.FORWARD else b)[op.stage])
    assert timeline.total_time == f[0] + m * f[1] + m * b[1] + b[0]
    assert timeline.busy == (m * (f[0] + b[0]), m * (f[1] + b[1]))


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m_of_p", [lambda p: p, lambda p: 3 * p + 1])
@pytest.mark.parametrize("f,b,w", [(1, 2, 1), (1, 1, 0.5), (1, 2, 0.5), (2, 3, 1)])
def test_zb_h1_bubble_matches_table_2_when_w_fits(p, m_of_p, f, b, w):
    timeline = simulate(schedules.zb_h1(p, m_of_p(p)), CostModel(forward=f, backward=b, weight_grad=w))
    assert all(bubble == pytest.approx((p - 1) * (f + b - 2 * w)) for bubble in timeline.bubble)


def test_zb_h1_closed_form_is_optimistic_when_w_exceeds_f():
    p = 4
    timeline = simulate(schedules.zb_h1(p, 16), CostModel(forward=1, backward=3, weight_grad=2))
    assert max(timeline.bubble) > (p - 1) * (1 + 3 - 2 * 2)


DUAL_EXACT = [  # (F, B, W, F&B) with I = B - W = F, W <= F, F&B <= F+B
    (1, 2, 1, 3), (1, 2, 1, 2.4), (1, 1.5, 0.5, 2.5), (2, 4, 2, 5),
]


@pytest.mark.parametrize("f,b,w,fb", DUAL_EXACT)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m_of_p", [lambda p: 2 * p, lambda p: 4 * p + 2])
def test_dualpipe_bubble_matches_table_2(f, b, w, fb, p, m_of_p):
    cost = CostModel(forward=f, backward=b, weight_grad=w, overlapped=fb)
    closed = (p / 2 - 1) * (fb + b - 3 * w)
    timeline = simulate(schedules.dualpipe(p, m_of_p(p)), cost)
    assert max(timeline.bubble) == pytest.approx(closed)
    # DualPipeV with the same number of stages (PP = p) runs on p/2 ranks with the same bubble.
    if p >= 4:
        timeline_v = simulate(schedules.dualpipev(p // 2, m_of_p(p)), cost)
        assert max(timeline_v.bubble) == pytest.approx(closed)


@pytest.mark.parametrize("f,b,w,direction", [(1, 1, 0.5, "worse"), (1, 2.5, 0.5, "better")])
def test_dualpipe_closed_form_is_not_exact_when_i_differs_from_f(f, b, w, direction):
    p = 8
    cost = CostModel(forward=f, backward=b, weight_grad=w)
    simulated = max(simulate(schedules.dualpipe(p, 4 * p), cost).bubble)
    closed = (p / 2 - 1) * (f + b + b - 3 * w)
    assert simulated > closed if direction == "worse" else simulated < closed


@pytest.mark.parametrize("p", [2, 4, 8])
def test_peak_activations_and_parameters_match_table_2(p):
    m, cost = 4 * p, CostModel()
    one_f_one_b = simulate(schedules.one_f_one_b(p, m), cost)
    # The last rank alternates F and B back to back: a B freeing at t and an F allocating at t
    # do not overlap. DualPipe's +1 comes from its overlapped pairs, which allocate before freeing.
    assert one_f_one_b.peak_activations == tuple(p - r for r in range(p))
    zb = simulate(schedules.zb_h1(p, m), cost)
    assert max(zb.peak_activations) == p  # same peak as 1F1B
    dual = simulate(schedules.dualpipe(p, m), cost)
    assert dual.peak_activations == (p + 1,) * p  # PP + 1
    dual_v = simulate(schedules.dualpipev(p, m), cost)  # 2p stages on p ranks
    assert dual_v.peak_activations == (2 * p + 1,) * p
    assert one_f_one_b.parameter_copies == zb.parameter_copies == (1,) * p
    assert dual.parameter_copies == dual_v.parameter_copies == (2,) * p


def _hand_schedule(rank0: str, rank1: str) -> Schedule:
    """A 2-rank, 2-micro-batch single-direction schedule from op strings like 'F0 F1 B0 B1'."""
    def ops(text, r):
        return tuple(Op(Kind(t[0]), int(t[1]), 0, r, 0) for t in text.split())

    return Schedule("hand", 2, 2, 2, ((0, 1),), ((0,), (1,)), (ops(rank0, 0), ops(rank1, 1)))


def test_deadlock_is_detected_with_a_clear_message():
    # Rank 0 waits for B0's gradient from rank 1, which first wants F1 from rank 0.
    with pytest.raises(DeadlockError, match=r"deadlocks(.|\n)*rank 0 at op #1 B0.0 waits for grad"):
        simulate(_hand_schedule("F0 B0 F1 B1", "F1 B1 F0 B0"), CostModel())


def test_backward_before_its_forward_deadlocks():
    with pytest.raises(DeadlockError, match="rank 1 at op #0 B0.0"):
        simulate(_hand_schedule("F0 F1 B0 B1", "B0 F0 F1 B1"), CostModel())


def test_repeated_op_is_rejected():
    with pytest.raises(ValueError, match="a second time"):
        simulate(_hand_schedule("F0 F1 F1 B0 B1", "F0 B0 F1 B1"), CostModel())


@pytest.mark.parametrize("kwargs,message", [
    (dict(forward=0), "forward must be > 0"),
    (dict(backward=1, weight_grad=1), "input_grad must be > 0"),
    (dict(p2p_latency=-1), "p2p_latency"),
])
def test_cost_model_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CostModel(**kwargs)


def test_cost_model_defaults():
    cost = CostModel(forward=1, backward=3, weight_grad=1)
    assert (cost.input_grad, cost.overlapped) == (2, 4)
    pair = Op(Kind.OVERLAPPED, 0, 0, 0, 0, backward=Op(Kind.INPUT_GRAD, 0, 1, 1, 1))
    assert cost.duration(pair) == 3


@pytest.mark.parametrize("name,p,m", [("1f1b", 4, 8), ("zb_h1", 4, 8), ("dualpipe", 4, 8),
                                      ("dualpipev", 3, 7)])
def test_tick_table_runs_each_op_once_after_its_inputs(name, p, m):
    schedule = schedules.make_schedule(name, p, m)
    table = tick_table(schedule)
    for r in range(p):
        assert [row[r] for row in table if row[r] is not None] == list(schedule.ops[r])
    tick = {}
    for t, row in enumerate(table):
        for op in row:
            for h in op.halves() if op else ():
                tick[(h.kind, h.direction, h.microbatch, h.stage)] = t
    for (kind, d, mb, s), t in tick.items():
        if kind == Kind.FORWARD and s > 0:
            assert tick[(Kind.FORWARD, d, mb, s - 1)] < t
        if kind in (Kind.BACKWARD, Kind.INPUT_GRAD) and s + 1 < schedule.num_stages:
            upstream = tick.get((Kind.BACKWARD, d, mb, s + 1), tick.get((Kind.INPUT_GRAD, d, mb, s + 1)))
            assert upstream < t
    if name == "1f1b":
        assert len(table) == 2 * (m + p - 1)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "dualpipe.png"
    fig = plot.plot_timeline(simulate(schedules.dualpipe(4, 8), CostModel()), str(path))
    assert path.stat().st_size > 1000
    assert len(fig.axes[0].texts) > 0  # micro-batch numbers are written in the cells
