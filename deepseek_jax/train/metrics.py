"""Where metrics go: TensorBoard event files, a CSV with one row per logged step, and a loss plot."""

from __future__ import annotations

import csv
import io
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever it is
    installed (the hf extra installs it), only to accept torch tensors, and that import costs every process
    that writes metrics 1.5 s of start-up; we write floats. A None in sys.modules makes `import torch` raise
    the ImportError tensorboardX expects when torch is absent."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _summary_writer_class()


def write_whole(path: str, text: str) -> None:
    """`path` with `text`, whole or not at all: written beside it and renamed into place, so a kill leaves
    the previous file (a run's metrics.csv, config.json, summary.json)."""
    with open(path + ".tmp", "w", newline="") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class MetricWriter:
    """Scalars to `workdir/tensorboard` and `workdir/metrics.csv`.

    The CSV has one row per write; its header is the union of the names seen so far (a new name
    rewrites the small file with the wider header). A resumed run keeps the rows already there up to the
    step it resumes from (`forget_after`): rows of steps it will run again are dropped, not repeated.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.csv_path = os.path.join(workdir, "metrics.csv")
        self._rows: list[dict] = []
        self._columns: list[str] = ["step"]
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None
        if enabled and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or ["step"])
                self._rows = list(reader)

    def forget_after(self, step: int) -> None:
        """Drops the CSV rows of steps after `step` (what a run killed after its last checkpoint logged)."""
        kept = [row for row in self._rows if int(float(row["step"])) <= step]
        if self.enabled and len(kept) < len(self._rows):
            self._rows = kept
            self._rewrite()

    def _rewrite(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self._columns, restval="")
        writer.writeheader()
        writer.writerows(self._rows)
        write_whole(self.csv_path, text.getvalue())

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        row = {"step": step, **scalars}
        self._rows.append(row)
        new = [name for name in scalars if name not in self._columns]
        if new:
            self._columns += sorted(new)
            self._rewrite()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, self._columns, restval="").writerow(row)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_csv(path: str) -> dict[str, np.ndarray]:
    """Columns of a metrics.csv as float arrays (empty cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows]) for k in rows[0]}


def plot_losses(csv_path: str, png_path: str, title: str = "") -> None:
    """loss.png: training losses over steps, and validation bits per byte where logged."""
    columns = read_csv(csv_path)
    if not columns:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    step = columns["step"]
    for name, style in (("loss", "-"), ("main_loss", "-"), ("mtp_loss", "--")):
        if name in columns:
            logged = ~np.isnan(columns[name])  # Validation rows share steps but leave these cells empty.
            ax.plot(step[logged], columns[name][logged], style, label=f"train {name} (nats)")
    if "eval_bpb" in columns:
        mask = ~np.isnan(columns["eval_bpb"])
        ax.plot(step[mask], columns["eval_bpb"][mask], "o-", label="validation bits/byte")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
