"""Draws a simulated schedule like the DeepSeek-V3 report's Figure 5.

Ranks are rows, time runs left to right, each op is a cell as wide as its simulated duration,
coloured by kind (forward orange, backward green, input-only backward light green, weight-gradient
blue) in a full tint for direction/slot 0 and a pale tint for slot 1, with its micro-batch number
written inside. An overlapped F&B pair is one black-bordered cell split into its forward and
backward parts in proportion to their costs.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from deepseek_jax.parallel.pipeline.schedules import Kind, Op
from deepseek_jax.parallel.pipeline.simulate import Timeline

# [kind][module slot] -> face colour.
COLOURS = {
    Kind.FORWARD: ("#f0a030", "#f8d49a"),
    Kind.BACKWARD: ("#4faf3a", "#a6d998"),
    Kind.INPUT_GRAD: ("#8fd46e", "#cdedbd"),
    Kind.WEIGHT_GRAD: ("#4c9be8", "#acd0f4"),
}
_LABELS = {Kind.FORWARD: "Forward", Kind.BACKWARD: "Backward",
           Kind.INPUT_GRAD: "Backward for input", Kind.WEIGHT_GRAD: "Backward for weights"}


def _cell(ax, x: float, width: float, row: int, op: Op, font_size: float, edge: str = "white") -> None:
    ax.add_patch(Rectangle((x, row - 0.45), width, 0.9, facecolor=COLOURS[op.kind][op.module],
                           edgecolor=edge, linewidth=0.6))
    if font_size > 0:
        ax.text(x + width / 2, row, str(op.microbatch), ha="center", va="center", fontsize=font_size)


def plot_timeline(timeline: Timeline, path: str | None = None, title: str | None = None) -> Figure:
    """Draws `timeline`; writes a PNG to `path` if given. Returns the figure."""
    schedule, cost = timeline.schedule, timeline.cost
    total = timeline.total_time
    width_in = min(max(8.0, 0.22 * total), 48.0)
    fig = Figure(figsize=(width_in, 0.45 * schedule.num_ranks + 1.6))
    ax = fig.add_subplot()
    # Label a cell only if a digit or two fits in the narrowest op (pt per time unit * min width).
    pt_per_unit = 72 * width_in * 0.9 / total
    narrowest = min(cost.forward, cost.input_grad, cost.weight_grad) * pt_per_unit
    font_size = min(9.0, narrowest / 1.6) if narrowest >= 6 else 0.0

    for rank, rank_ops in enumerate(timeline.ops):
        for t in rank_ops:
            if t.op.kind == Kind.OVERLAPPED:
                f, b = t.op.halves()
                b_cost = cost.backward if b.kind == Kind.BACKWARD else cost.input_grad
                split = (t.end - t.start) * cost.forward / (cost.forward + b_cost)
                _cell(ax, t.start, split, rank, f, font_size)
                _cell(ax, t.start + split, t.end - t.start - split, rank, b, font_size)
                ax.add_patch(Rectangle((t.start, rank - 0.45), t.end - t.start, 0.9, fill=False,
                                       edgecolor="black", linewidth=1.2))
            else:
                _cell(ax, t.start, t.end - t.start, rank, t.op, font_size)

    ax.set_xlim(0, total)
    ax.set_ylim(schedule.num_ranks - 0.5, -0.5)
    ax.set_yticks(range(schedule.num_ranks), [f"Device {r}" for r in range(schedule.num_ranks)])
    ax.set_xlabel("time")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    used = {(h.kind, h.module) for rank_ops in schedule.ops for op in rank_ops for h in op.halves()}
    handles = [Patch(facecolor=COLOURS[k][m], label=f"{_LABELS[k]} (slot {m})")
               for k in COLOURS for m in (0, 1) if (k, m) in used]
    handles.append(Patch(facecolor="none", edgecolor="black", label="Overlapped forward & backward"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / schedule.num_ranks - 0.12),
              ncol=min(len(handles), 5), fontsize=8, frameon=False)
    bubble = max(timeline.bubble)
    ax.set_title(title or f"{schedule.name}: P={schedule.num_ranks}, M={schedule.num_microbatches}, "
                 f"total {total:g}, max bubble {bubble:g} (F={cost.forward:g}, B={cost.backward:g}, "
                 f"W={cost.weight_grad:g}, F&B={cost.overlapped:g})", fontsize=10)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=150)
    return fig
