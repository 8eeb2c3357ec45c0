"""`megagpt sweep-report DIR`: the final validation loss of every run, best first."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from megagpt.errors import MissingFileError
from megagpt.launch.sweep import MANIFEST, Sweep


@dataclass
class RunResult:
    name: str
    point: dict[str, str]
    val_loss: float | None = None
    step: int | None = None
    problem: str | None = None
    """Why the run has no final validation loss; None for a finished run."""


def read_run(name: str, point: dict[str, str], output_dir: Path) -> RunResult:
    """The last validation loss of the run in `output_dir`, or why there is none."""
    result = RunResult(name, point)
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        result.problem = "no metrics.jsonl: not started, or failed before its first step"
        return result
    records = []
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            result.problem = f"metrics.jsonl line {number} is not JSON (a write cut short?)"
            return result
    if not records:
        result.problem = "metrics.jsonl is empty: failed before its first step"
        return result
    result.step = records[-1]["step"]
    with_val = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    if with_val:
        result.val_loss = with_val[-1]["val_loss"]
    max_steps = _max_steps(output_dir)
    if max_steps is not None and result.step < max_steps:
        result.problem = f"unfinished: stopped at step {result.step} of {max_steps}"
    elif result.val_loss is None:
        result.problem = "no validation loss logged (train.eval_interval = 0?)"
    elif not math.isfinite(result.val_loss):
        result.problem = f"validation loss is {result.val_loss}"
    return result


def _max_steps(output_dir: Path) -> int | None:
    config = output_dir / "config.yaml"
    if not config.is_file():
        return None
    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return data.get("train", {}).get("max_steps")


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
            f"{root}: no {MANIFEST} and no run directories with metrics.jsonl; "
            "give the --output-dir of `megagpt launch sweep`"
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
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    title = "  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip()
    return "\n".join([title, *lines]) + "\n"
