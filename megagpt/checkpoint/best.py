"""checkpoint.keep_best: the saved checkpoint with the best value of an evaluation metric.

A checkpoint saved at an evaluation step records that evaluation's metrics in its
metadata.json ("metrics"), so which one is best can always be read back from disk: a
resumed run recovers the best so far from the checkpoints of its root up to the step
it resumed from (later ones belong to a run it replaces). The best one is exempt from
keep_last/keep_every retention, and the `best` pointer beside `latest` names it.
Only the main rank keeps this record: it alone publishes and deletes checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megagpt.checkpoint import layout
from megagpt.config.metric_mode import improves, metric_mode

log = logging.getLogger(__name__)


class BestCheckpoint:
    """The step and value of the best checkpoint so far by `metric` (None before any)."""

    def __init__(self, metric: str, mode: str = "auto"):
        self.metric, self.mode = metric, metric_mode(metric, mode)
        self.step: int | None = None
        self.value: float | None = None

    @property
    def name(self) -> str | None:
        """The best checkpoint's directory name, or None before there is one."""
        return layout.step_dir_name(self.step) if self.step is not None else None

    def improves(self, metrics: dict[str, float]) -> bool:
        """Whether an evaluation with these metrics beats the best so far (strictly; an
        evaluation that did not measure the metric never does)."""
        value = metrics.get(self.metric)
        return value is not None and improves(float(value), self.value, self.mode)

    def consider(self, step: int, metrics: dict[str, float]) -> bool:
        """Record checkpoint `step`, saved with these metrics; True if it is the new best."""
        if not self.improves(metrics):
            return False
        self.step, self.value = step, float(metrics[self.metric])
        return True

    def recover(self, root: Path, up_to_step: int) -> None:
        """The best so far among the complete checkpoints of `root` up to `up_to_step`
        (a resume), read from their metadata; the `best` pointer is set to name it."""
        self.step = self.value = None
        for directory in sorted(root.glob("step_*")):
            step = int(directory.name.split("_")[1])
            if step > up_to_step or not (directory / layout.METADATA).is_file():
                continue
            try:
                metrics = layout.read_metadata(directory).get("metrics") or {}
            except layout.CheckpointError as error:
                log.warning("checkpoint.keep_best: skipping %s: %s", directory, error)
                continue
            self.consider(step, metrics)
        if self.step is None:
            return
        layout.point_best(root, self.step)
        log.info(
            "checkpoint.keep_best: the best %s so far is %.6g, at %s",
            self.metric,
            self.value,
            root / self.name,
        )
