"""`megagpt sweep-report DIR`: every run of a sweep ranked, and PNG plots of the sweep.

A grid or random sweep (sweep.json) is ranked by the final validation loss of each run;
an Optuna search (search.json) by each trial's value of its metric, as the study holds
it, with the trial's state (COMPLETE, PRUNED, FAIL, RUNNING). The plots, written into
DIR: validation_curves.png (the metric of every run against the step, from each run's
metrics.jsonl) and best_so_far.png (each finished run's value and the best so far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from megagpt.errors import MissingFileError
from megagpt.launch.runs import format_table, read_records, read_run_config
from megagpt.launch.sweep import MANIFEST, Sweep

SEARCH_MANIFEST = "search.json"  # megagpt.launch.search.MANIFEST, without importing Optuna
CURVES_PLOT = "validation_curves.png"
BEST_PLOT = "best_so_far.png"


@dataclass
class RunResult:
    name: str
    point: dict[str, str]
    val_loss: float | None = None
    step: int | None = None
    problem: str | None = None
    """Why the run has no final validation loss; None for a finished run."""
    directory: Path | None = None


def read_run(name: str, point: dict[str, str], output_dir: Path) -> RunResult:
    """The last validation loss of the run in `output_dir`, or why there is none."""
    result = RunResult(name, point, directory=output_dir)
    records = read_records(output_dir)
    if records.problem:
        result.problem = records.problem
        return result
    result.step = records.last_step
    result.val_loss = records.last("val_loss")
    max_steps = read_run_config(output_dir).get("train", {}).get("max_steps")
    if max_steps is not None and result.step < max_steps:
        result.problem = f"unfinished: stopped at step {result.step} of {max_steps}"
    elif result.val_loss is None:
        result.problem = "no validation loss logged (train.eval_interval = 0?)"
    elif not math.isfinite(result.val_loss):
        result.problem = f"validation loss is {result.val_loss}"
    return result


def collect_results(directory: str | Path) -> list[RunResult]:
    """Every run of the sweep in `directory` (from sweep.json, else each subdirectory
    with a metrics.jsonl), finished runs by validation loss, then the others by name."""
    root = Path(directory)
    if (root / MANIFEST).is_file():
        sweep = Sweep.load(root)
        runs = [(r.name, r.point, Path(r.output_dir)) for r in sweep.runs]
    else:
        runs = [(p.parent.name, {}, p.parent) for p in sorted(root.glob("*/metrics.jsonl"))]
    if not runs:
        raise MissingFileError(
            f"{root}: no {MANIFEST}, no {SEARCH_MANIFEST} and no run directories with "
            "metrics.jsonl; give the --output-dir of `megagpt launch sweep`"
        )
    results = [read_run(name, point, path) for name, point, path in runs]
    finished = sorted((r for r in results if r.problem is None), key=lambda r: r.val_loss)
    others = [r for r in results if r.problem is not None]
    return finished + others


def format_report(results: list[RunResult]) -> str:
    """A plain-text table, one row per run."""
    keys = list(dict.fromkeys(k for r in results for k in r.point))
    header = ["rank", "run", *keys, "val_loss", "step", "note"]
    rows = []
    for rank, r in enumerate(results, 1):
        loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        rows.append(
            [
                str(rank) if r.problem is None else "-",
                r.name,
                *(r.point.get(k, "") for k in keys),
                loss,
                str(r.step) if r.step is not None else "-",
                r.problem or "",
            ]
        )
    return format_table(header, rows)


# ---------------------------------------------------------------------- Optuna searches
@dataclass
class TrialResult:
    number: int
    state: str
    params: dict
    value: float | None
    step: int | None
    note: str


def collect_trials(directory: str | Path) -> tuple[object, list[TrialResult]]:
    """(the Search, its trials ranked): finished trials by value, best first, then the
    pruned ones, then failed and running ones, each group by trial number."""
    from megagpt.launch.search import Search

    search = Search.load(directory)
    trials = []
    for trial in search.study().get_trials(deepcopy=False):
        reported = trial.intermediate_values
        step = max(reported) if reported else None
        value = trial.value if trial.value is not None else reported.get(step)
        note = trial.user_attrs.get("note", "")
        trials.append(TrialResult(trial.number, trial.state.name, trial.params, value, step, note))
    sign = -1 if search.direction == "maximize" else 1
    complete = sorted((t for t in trials if t.state == "COMPLETE"), key=lambda t: sign * t.value)
    order = {"PRUNED": 0, "FAIL": 1}
    others = sorted(
        (t for t in trials if t.state != "COMPLETE"),
        key=lambda t: (order.get(t.state, 2), t.number),
    )
    return search, complete + others


def _show(value: object) -> str:
    return format(value, ".4g") if isinstance(value, float) else str(value)


def format_trials(search, trials: list[TrialResult]) -> str:
    """A plain-text table, one row per trial; only finished trials get a rank."""
    keys = [param.key for param in search.space]
    header = ["rank", "trial", *keys, search.metric, "state", "step", "note"]
    rows = []
    for rank, t in enumerate(trials, 1):
        rows.append(
            [
                str(rank) if t.state == "COMPLETE" else "-",
                f"trial-{t.number}",
                *(_show(t.params[k]) if k in t.params else "" for k in keys),
                f"{t.value:.4f}" if t.value is not None else "-",
                t.state,
                str(t.step) if t.step is not None else "-",
                t.note,
            ]
        )
    return format_table(header, rows)


def write_report(directory: str | Path, plots: bool = True) -> str:
    """The report's text: the table, then where the plots were written (if `plots`)."""
    from megagpt.launch.plots import plot_best_so_far, plot_metric_curves

    root = Path(directory)
    if (root / SEARCH_MANIFEST).is_file():
        search, trials = collect_trials(root)
        text = format_trials(search, trials)
        metric, maximize = search.metric, search.direction == "maximize"
        by_number = sorted(trials, key=lambda t: t.number)
        runs = {f"trial-{t.number}": search.trial_directory(t.number) for t in by_number}
        numbers = [t.number for t in by_number]
        finals = [t.value if t.state == "COMPLETE" else None for t in by_number]
        pruned = [t.value if t.state == "PRUNED" else None for t in by_number]
        xlabel = "trial"
    else:
        results = collect_results(root)
        text = format_report(results)
        metric, maximize = "val_loss", False
        by_name = {r.name: r for r in results}
        if (root / MANIFEST).is_file():  # sweep order: run-0, run-1, ...
            order = [run.name for run in Sweep.load(root).runs]
        else:
            order = sorted(by_name)
        ordered = [by_name[name] for name in order]
        runs = {r.name: r.directory for r in ordered}
        numbers = list(range(len(ordered)))
        finals = [r.val_loss if r.problem is None else None for r in ordered]
        xlabel = "run (in sweep order)"
        pruned = []
    if not plots:
        return text
    records = {name: read_records(path) for name, path in runs.items()}
    curves = plot_metric_curves(records, metric, root / CURVES_PLOT)
    best = plot_best_so_far(numbers, finals, maximize, metric, root / BEST_PLOT, xlabel, pruned)
    return f"{text}\nplots: {curves}\n       {best}\n"
