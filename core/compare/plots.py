"""``distillzoo plot RUN_DIR...``: the curves of training runs, drawn from their metrics.jsonl.

One panel per metric, three to a row (by default the training loss and every held-out ``eval/*``
value any run logged), one line per run, steps on the x axis, the metric and its
unit on the y axis. It needs matplotlib (``pip install "distillzoo[plot]"``) and
draws off-screen (Agg), so it runs on a headless machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from distillzoo.errors import DataError, ParameterError

#: axis labels of the metrics the trainer logs (others are labelled by their key)
LABELS = {
    "loss": "training loss (per token or pair)",
    "lr": "learning rate",
    "grad_norm": "gradient norm (before clipping)",
    "tokens_per_s": "throughput (tokens/s)",
    "eval/nll": "held-out NLL (nats/token)",
    "eval/kl_teacher_student": "held-out KL(teacher||student) (nats/token)",
}


def read_curves(run_dirs: Sequence[str | Path], metrics: Sequence[str] | None = None) -> dict[str, dict[str, list]]:
    """``{metric: {run label: [(step, value), ...]}}`` from each run's metrics.jsonl.

    A line cut short by a crash is skipped, as a resume would drop it. Non-finite
    values are left out. ``metrics`` defaults to ``loss`` and every ``eval/*`` key.
    Labels are the run directories' names, or their last two path parts where names
    repeat.
    """
    if not run_dirs:
        raise ParameterError("plot: give at least one run directory")
    paths = [Path(d) for d in run_dirs]
    names = [p.name for p in paths]
    labels = [p.name if names.count(p.name) == 1 else f"{p.parent.name}/{p.name}" for p in paths]
    records: dict[str, list[dict]] = {}
    for label, path in zip(labels, paths):
        file = path / "metrics.jsonl"
        if not file.is_file():
            raise DataError(f"plot: {path} has no metrics.jsonl (is it a distillzoo train output_dir?)")
        rows = []
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # half-written by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        records[label] = rows
    present = {k for rows in records.values() for row in rows for k in row}
    if metrics is None:
        metrics = [m for m in ["loss"] + sorted(k for k in present if k.startswith("eval/")) if m in present]
    else:
        unknown = [m for m in metrics if m not in present]
        if unknown:
            raise ParameterError(f"plot: no run logged {unknown}; logged: {', '.join(sorted(present - {'step'}))}")
    return {m: {label: [(row["step"], float(row[m])) for row in rows
                        if isinstance(row.get(m), (int, float)) and math.isfinite(row[m])]
                for label, rows in records.items()}
            for m in metrics}


def colours(labels: Sequence[str]) -> dict:
    """One colour per label, the same in every panel and plot (tab10; tab20 beyond ten labels)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, metrics: Sequence[str] | None = None):
    """Draw :func:`read_curves` to the PNG ``out``; returns the matplotlib figure."""
    try:
        import matplotlib
    except ImportError:
        raise ParameterError('plot: needs matplotlib: pip install "distillzoo[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(run_dirs, metrics)
    if not curves:
        raise ParameterError("plot: the runs logged no loss or eval/* values; name metrics with --metric")
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        fig.delaxes(ax)  # the empty cells of the last row
    labels = list(next(iter(curves.values())))
    colors = colours(labels)
    for ax, (metric, by_run) in zip(axes.flat, curves.items()):
        for label, points in by_run.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 12 else None, markersize=3, label=label,
                        color=colors[label])
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig
