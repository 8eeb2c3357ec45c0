"""`megagpt compare RUN_DIR...`: a table of runs side by side and a PNG of their losses.

    megagpt compare runs/lr3e-4 runs/lr1e-3 sweep/trial-7 --plot compare.png

Per run: the best validation loss and its step, the final one, the steps and tokens
trained, the last value of every downstream task metric (eval/<task>/<metric>), and
the wall time spent training. Everything is read from the runs' metrics.jsonl and
config.yaml; no model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.errors import MissingFileError
from megagpt.launch.runs import RunRecords, format_table, read_records, read_run_config
from megagpt.utils.formatting import format_duration


@dataclass
class RunSummary:
    name: str
    records: RunRecords
    best_val_loss: float | None = None
    best_step: int | None = None
    final_val_loss: float | None = None
    steps: int | None = None
    tokens: int | None = None
    wall_time_s: float | None = None
    tasks: dict[str, float] = field(default_factory=dict)
    """The last value of each eval/<task>/<metric> logged."""


def summarize_run(name: str, directory: Path) -> RunSummary:
    """What the table shows of the run in `directory`."""
    records = read_records(directory)
    summary = RunSummary(name, records, steps=records.last_step)
    steps, losses = records.series("val_loss")
    if losses:
        best = min(range(len(losses)), key=losses.__getitem__)
        summary.best_val_loss, summary.best_step = losses[best], steps[best]
    summary.final_val_loss = records.last("val_loss")
    config = read_run_config(directory)
    batch = config.get("train", {}).get("global_batch_size")
    seq_len = config.get("data", {}).get("seq_len")
    if summary.steps is not None and batch and seq_len:
        summary.tokens = summary.steps * batch * seq_len
    summary.wall_time_s = records.wall_time_s()
    task_keys = dict.fromkeys(k for r in records.records for k in r if k.startswith("eval/"))
    for key in task_keys:
        value = records.last(key)
        if value is not None:
            summary.tasks[key] = value
    return summary


def summarize_runs(directories: Sequence[str | Path]) -> list[RunSummary]:
    """One summary per directory, in the order given. Runs are named by their directory
    name, or by the path given when two names would be the same.

    Raises:
        MissingFileError: a directory that does not exist.
    """
    paths = [Path(d) for d in directories]
    for path in paths:
        if not path.is_dir():
            raise MissingFileError(f"{path}: no such run directory (a train.output_dir)")
    names = [p.name for p in paths]
    unique = len(set(names)) == len(names)
    return [summarize_run(p.name if unique else str(p), p) for p in paths]


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _wall_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(seconds)


def format_comparison(summaries: list[RunSummary]) -> str:
    """The table `megagpt compare` prints: one row per run."""
    task_keys = list(dict.fromkeys(k for s in summaries for k in s.tasks))
    header = ["run", "best_val_loss", "at_step", "final_val_loss", "steps", "tokens"]
    header += [*task_keys, "wall_time", "note"]
    rows = []
    for s in summaries:
        rows.append(
            [
                s.name,
                _number(s.best_val_loss),
                "-" if s.best_step is None else str(s.best_step),
                _number(s.final_val_loss),
                "-" if s.steps is None else str(s.steps),
                "-" if s.tokens is None else f"{s.tokens:,}",
                *(_number(s.tasks.get(k)) for k in task_keys),
                _wall_time(s.wall_time_s),
                s.records.problem or "",
            ]
        )
    return format_table(header, rows)


def write_comparison_plot(summaries: list[RunSummary], path: str | Path) -> Path:
    """A PNG of the training and validation loss curves of every run."""
    from megagpt.launch.plots import plot_loss_curves

    return plot_loss_curves({s.name: s.records for s in summaries}, Path(path))
