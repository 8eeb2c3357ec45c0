"""Reading a finished (or unfinished) run directory: its metrics.jsonl and config.yaml.

Shared by `megagpt sweep-report` and `megagpt compare`, which only read files, so they
work on runs from any machine (copied back from a cluster) without loading a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class RunRecords:
    """Every record of a run's metrics.jsonl, or why there are none."""

    directory: Path
    records: list[dict] = field(default_factory=list)
    problem: str | None = None
    """Why the records are missing or unreadable; None when they were read."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the finite numbers logged under `key`, in order."""
        steps, values = [], []
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps.append(record["step"])
                values.append(float(value))
        return steps, values

    def last(self, key: str) -> float | None:
        """The last value logged under `key` (finite or not), or None."""
        for record in reversed(self.records):
            value = record.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None

    @property
    def last_step(self) -> int | None:
        return self.records[-1]["step"] if self.records else None

    def wall_time_s(self) -> float | None:
        """Seconds spent training, summed over resumed segments: elapsed_s restarts at
        0 in each run that resumes the directory. None for records written without it."""
        total, segment_end, previous = 0.0, None, None
        for record in self.records:
            elapsed = record.get("elapsed_s")
            if not isinstance(elapsed, (int, float)):
                continue
            if previous is not None and elapsed < previous:  # a resumed run began
                total += segment_end
            segment_end = previous = elapsed
        return None if segment_end is None else total + segment_end


def read_records(directory: str | Path) -> RunRecords:
    """The metrics.jsonl of the run in `directory`; a missing, empty or cut-short file
    is reported in `problem`, never raised."""
    run = RunRecords(Path(directory))
    path = run.directory / "metrics.jsonl"
    if not path.is_file():
        run.problem = "no metrics.jsonl: not started, or failed before its first step"
        return run
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            run.records.append(json.loads(line))
        except json.JSONDecodeError:
            run.records = []
            run.problem = f"metrics.jsonl line {number} is not JSON (a write cut short?)"
            return run
    if not run.records:
        run.problem = "metrics.jsonl is empty: failed before its first step"
    return run


def read_run_config(directory: str | Path) -> dict:
    """The run's config.yaml as a plain dict ({} when there is none)."""
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, one line per row."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    title = "  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip()
    return "\n".join([title, *lines]) + "\n"
