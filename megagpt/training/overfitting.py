"""Overfitting controls: the train/validation gap, early stopping, the epochs check.

- `train_val_gap`, logged at every evaluation: the validation loss minus the mean
  training loss of the steps since the previous scheduled evaluation (every
  train.eval_interval steps). Training losses are measured with dropout on, so a
  small negative gap is normal; a growing positive one is overfitting.
- `train.early_stopping`: an EvaluationHook that stops the run once the watched
  metric has gone `patience` scheduled evaluations without improving by `min_delta`.
- data.max_epochs: the epochs each training dataset will be read (megagpt.data.epochs),
  checked at start-up.

Both the gap's running window and early stopping's record (best value, its step, the
evaluations since) go into every checkpoint's metadata and are restored on resume, so
a resumed run logs the same gaps and stops at the same step as an uninterrupted one.
Only scheduled evaluations count: the extra one at the last step of a shorter run
(train.max_steps reached off the interval) neither resets the window nor counts
toward patience, since a resumed run would not have made it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch.distributed as dist

from megagpt.config import Config, ConfigError
from megagpt.config.metric_mode import improves, metric_mode
from megagpt.data.dataset import SplitDatasets
from megagpt.data.epochs import check_epochs

log = logging.getLogger(__name__)

GAP = "train_val_gap"
"""The metric name of the gap: val_loss minus the mean training loss since the last
scheduled evaluation."""


class EarlyStopping:
    """An EvaluationHook: a reason to stop once `metric` has not improved by more than
    `min_delta` for `patience` scheduled evaluations in a row.

    Args:
        metric: The evaluation metric watched (val_loss, eval/<task>/acc, ...).
        patience: Scheduled evaluations without an improvement that stop the run.
        min_delta: How much a value must beat the best by to count as an improvement.
        mode: "min", "max", or "auto" (from the name; see megagpt.config.metric_mode).
        every: The evaluation interval; evaluations at other steps are not counted.
    """

    def __init__(
        self,
        metric: str,
        patience: int,
        min_delta: float = 0.0,
        mode: str = "auto",
        every: int = 1,
    ):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.mode = metric_mode(metric, mode)
        self.every = every  # train.eval_interval: evaluations off it are not counted
        self.best: float | None = None
        self.best_step: int | None = None
        self.since = 0  # scheduled evaluations since the best one

    @classmethod
    def from_config(cls, config: Config) -> EarlyStopping | None:
        """The hook train.early_stopping describes, or None when patience is 0."""
        s = config.train.early_stopping
        if s.patience <= 0:
            return None
        every = config.train.eval_interval
        if s.metric.startswith("eval/") and config.eval.interval is not None:
            every = config.eval.interval  # the tasks' own schedule
        return cls(s.metric, s.patience, s.min_delta, s.mode, every)

    def __call__(self, step: int, metrics: dict[str, float]) -> str | None:
        value = metrics.get(self.metric)
        if value is None or step % self.every:
            return None
        if improves(float(value), self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.since = float(value), step, 0
            return None
        self.since += 1
        if self.since < self.patience:
            return None
        best = "none finite" if self.best is None else f"{self.best:.6g}"
        return (
            f"early stopping: {self.metric} has not improved by min_delta={self.min_delta:g} "
            f"for {self.since} evaluations since step {self.best_step or 0} (best {best}; "
            f"train.early_stopping.patience={self.patience})"
        )

    def state(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "evaluations_since_best": self.since,
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's record (if it watched the same metric the same way)."""
        if not state or (state.get("metric"), state.get("mode")) != (self.metric, self.mode):
            return
        self.best, self.best_step = state["best"], state["best_step"]
        self.since = int(state["evaluations_since_best"])
        log.info(
            "early stopping resumes: best %s %s at step %s, %d evaluations since",
            self.metric,
            self.best,
            self.best_step,
            self.since,
        )


class OverfittingControls:
    """What the training loop does about overfitting; see the module docstring."""

    def __init__(self, config: Config, datasets: SplitDatasets):
        self.config = config
        t = config.train
        check_epochs(config.data, datasets.train, t.max_steps * t.global_batch_size)
        self.early_stopping = EarlyStopping.from_config(config)
        # A classifier's training loss adds finetune.lm_loss_weight x the LM loss, which
        # its validation loss lacks: no gap between those two.
        self.logs_gap = not (config.model.num_labels and config.finetune.lm_loss_weight)
        self._window = [0.0, 0]  # sum and count of training losses since the last evaluation
        self._checked: set[str] = set()
        self._check_watched(has_valid=datasets.valid is not None)

    def hooks(self) -> list:
        """The evaluation hooks these settings ask for (early stopping), first in line."""
        return [self.early_stopping] if self.early_stopping is not None else []

    def watched(self) -> dict[str, str]:
        """The metrics the settings watch, by the setting that names them."""
        names = {}
        if self.early_stopping is not None:
            names["train.early_stopping.metric"] = self.early_stopping.metric
        if self.config.checkpoint.keep_best:
            names["checkpoint.keep_best"] = self.config.checkpoint.keep_best
        return names

    def _check_watched(self, has_valid: bool) -> None:
        """Refuse, before the model is built, a watched metric no evaluation will log."""
        if self.config.model.num_labels:
            logged = ["val_loss", "val_accuracy", "val_macro_f1"]
        else:
            logged = ["val_loss", "val_ppl"]
        logged += [GAP] if self.logs_gap else []
        for key, metric in self.watched().items():
            if not has_valid:
                raise ConfigError(
                    f"{key} = {metric!r} needs a validation split, but data.split = "
                    f"{self.config.data.split!r} leaves none: give it a validation share"
                )
            if metric.startswith("eval/"):
                if not self.config.eval.tasks or self.config.eval.interval == 0:
                    raise ConfigError(
                        f"{key} = {metric!r}: eval/... metrics come from eval.tasks, which "
                        "this run does not evaluate (empty, or eval.interval=0); list the "
                        "tasks there, or watch one of " + ", ".join(logged)
                    )
                continue  # the task metrics are checked at the first evaluation
            if metric not in logged:
                raise ConfigError(
                    f"{key} = {metric!r} is not a metric this run evaluates; choose one of "
                    + ", ".join(logged)
                    + " (or eval/<task>/<metric> of eval.tasks)"
                )

    def check_metrics(self, metrics: dict[str, float]) -> None:
        """At an evaluation (every rank: the metrics are the same everywhere): a watched
        eval/<task>/... metric must be among those the downstream tasks logged."""
        logged = [name for name in metrics if name.startswith("eval/")]
        for key, metric in self.watched().items():
            if metric in self._checked or not metric.startswith("eval/") or not logged:
                continue
            if metric not in metrics:
                raise ConfigError(
                    f"{key} = {metric!r} is not among the task metrics this run logs: "
                    + ", ".join(logged)
                )
            self._checked.add(metric)

    # ------------------------------------------------------------------ the gap
    def add_train_loss(self, loss: float) -> None:
        if math.isfinite(loss):
            self._window[0] += loss
            self._window[1] += 1

    def add_gap(self, step: int, metrics: dict[str, float]) -> None:
        """Add train_val_gap to an evaluation's metrics; a scheduled evaluation starts a
        new window."""
        total, count = self._window
        if not (self.logs_gap and count and "val_loss" in metrics):
            return
        metrics[GAP] = metrics["val_loss"] - total / count
        interval = self.config.train.eval_interval
        if interval and step % interval == 0:
            self._window = [0.0, 0]

    # ------------------------------------------------------------------ resume
    def state(self) -> dict[str, Any]:
        """What a checkpoint records so that a resume continues exactly."""
        state: dict[str, Any] = {"train_loss_window": list(self._window)}
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping.state()
        return state

    def restore(self, metadata: dict[str, Any]) -> None:
        window = metadata.get("train_loss_window")
        if window:
            self._window = [float(window[0]), int(window[1])]
        if self.early_stopping is not None:
            self.early_stopping.restore(metadata.get("early_stopping"))


def gap_text(metrics: dict[str, float]) -> str:
    """The gap for the evaluation's console line ("" when not logged)."""
    return f" | train-val gap {metrics[GAP]:+.4f}" if GAP in metrics else ""


def saves_as_best(checkpointer, env, metrics: dict[str, float]) -> bool:
    """checkpoint.keep_best: whether this evaluation beats every checkpoint saved so far,
    and so gets a checkpoint even off checkpoint.interval. The main rank decides (it
    alone keeps the record) and tells every rank, since a save takes them all."""
    if not (metrics and checkpointer.config.checkpoint.keep_best):
        return False
    decision = [checkpointer.is_new_best(metrics)]
    if env.world_size > 1:
        dist.broadcast_object_list(decision, src=0)
    return bool(decision[0])
