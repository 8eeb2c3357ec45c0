"""PNG plots of runs for `megagpt sweep-report` and `megagpt compare`.

Figures are drawn with matplotlib's object API on its Agg canvas (no pyplot, no
display, no global backend switch), so plotting works on a headless login node and
inside a process that also trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megagpt.launch.runs import RunRecords


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _save(figure, axes, path: Path, legend: bool) -> Path:
    if legend and axes.get_legend_handles_labels()[0]:
        # Many runs: a legend outside the axes keeps the curves visible.
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_metric_curves(runs: dict[str, RunRecords], metric: str, path: Path) -> Path:
    """One line per run: `metric` against the step (validation curves of a sweep)."""
    figure, axes = _figure(f"{metric} of every run", "step", metric)
    for name, run in runs.items():
        steps, values = run.series(metric)
        if steps:
            axes.plot(steps, values, marker="o", markersize=3, label=name)
    return _save(figure, axes, path, legend=True)


def plot_best_so_far(
    numbers: Sequence[int],
    values: Sequence[float | None],
    maximize: bool,
    metric: str,
    path: Path,
    xlabel: str = "trial",
    pruned: Sequence[float | None] = (),
) -> Path:
    """Each finished trial's value as a dot, the best value so far as a step line, and
    (from `pruned`) the last value of each pruned trial as a cross, against the trial
    number; `None` leaves a trial out."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(f"best {metric} so far", xlabel, metric)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    finished = [(n, v) for n, v in zip(numbers, values) if v is not None]
    stopped = [(n, v) for n, v in zip(numbers, pruned) if v is not None]
    if stopped:
        axes.scatter(*zip(*stopped), s=24, marker="x", color="tab:orange", label="pruned")
    if finished:
        axes.scatter(*zip(*finished), s=16, color="tab:gray", label="finished")
        best, xs, ys = None, [], []
        for number, value in finished:
            if best is None or (value > best if maximize else value < best):
                best = value
            xs.append(number)
            ys.append(best)
        xs.append(max(numbers))  # the line runs on to the last trial
        ys.append(best)
        axes.step(xs, ys, where="post", color="tab:red", label="best so far")
    return _save(figure, axes, path, legend=True)


def plot_loss_curves(runs: dict[str, RunRecords], path: Path) -> Path:
    """Training loss (solid) and validation loss (dashed, dots) of every run, one
    colour per run."""
    figure, axes = _figure("training and validation loss", "step", "loss")
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for colour, (name, run) in zip(colours, runs.items()):
        steps, losses = run.series("loss")
        if steps:
            axes.plot(steps, losses, color=colour, linewidth=1, label=f"{name} train")
        steps, losses = run.series("val_loss")
        if steps:
            axes.plot(steps, losses, "--o", color=colour, markersize=3, label=f"{name} valid")
    return _save(figure, axes, path, legend=True)
