"""What a run evaluates, and what follows from it: validation (the loss, or a
classifier's accuracy and macro-F1), downstream tasks (eval.tasks), the train/validation
gap, and the evaluation hooks that may stop the run (early stopping, a search's
pruning). The trainer calls `at_step` after every step and `ask_hooks` with what it
returned; `TrainResult` collects what the run produced.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from megagpt.config import Config
from megagpt.training.downstream import DownstreamEvaluator
from megagpt.training.overfitting import OverfittingControls, gap_text

log = logging.getLogger(__name__)

EvaluationHook = Callable[[int, dict[str, float]], "str | None"]
"""Called on the main rank after every evaluation with the step and its metrics (the
ones logged: val_loss, ...). A returned string stops the run after this step, with a
checkpoint, and is logged and kept as TrainResult.stop_reason (early stopping, a
search's pruning)."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Global-batch loss of every step this run took, in order."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    checkpoint: Path | None = None
    """Directory of the last checkpoint written."""
    memory: dict[str, int] = field(default_factory=dict)
    """This rank's parameter, gradient and optimizer-state bytes after the first step."""
    start_step: int = 0
    """The step this run started from (non-zero after a resume)."""
    preempted: bool = False
    """The run stopped early on SIGUSR1/SIGTERM or Ctrl-C, after saving a checkpoint."""
    stop_signal: str | None = None
    """The signal that stopped it early (SIGUSR1, SIGTERM, SIGINT), if any."""
    val_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    """Every evaluation metric by step (validation, classifier and downstream tasks)."""
    skipped_steps: list[int] = field(default_factory=list)
    """Steps whose loss or gradient norm was not finite, skipped without an update."""
    stop_reason: str | None = None
    """Why an evaluation hook stopped the run early (see EvaluationHook), if one did."""


class Evaluations:
    """A run's evaluations; build it before the model, so that bad task files fail first."""

    def __init__(
        self,
        config: Config,
        env,
        datasets,
        hooks: Sequence[EvaluationHook],
        overfitting: OverfittingControls,
    ):
        self.config, self.env, self.valid = config, env, datasets.valid
        self.hooks, self.overfitting = list(hooks), overfitting
        self.downstream = DownstreamEvaluator(config) if config.eval.tasks else None

    def at_step(self, module, done: int, is_last: bool, result: TrainResult) -> dict:
        """The metrics of whatever evaluation is due after step `done` (none: {})."""
        metrics = self._validate(module, done, is_last, result)
        metrics.update(self._tasks(module, done, is_last, result))
        return metrics

    def _validate(self, module, done: int, is_last: bool, result: TrainResult) -> dict:
        t, valid = self.config.train, self.valid
        if not (t.eval_interval and valid and (done % t.eval_interval == 0 or is_last)):
            return {}
        if self.config.model.num_labels:
            metrics = module.evaluate_classifier(valid)
            details = [
                f"accuracy {metrics['val_accuracy']:.4f}",
                f"macro-F1 {metrics['val_macro_f1']:.4f}",
            ]
        else:
            val_loss = module.evaluate(valid)
            metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
            details = [f"perplexity {metrics['val_ppl']:.2f}"]
        self.overfitting.add_gap(done, metrics)
        result.val_losses[done] = metrics["val_loss"]
        result.val_metrics.setdefault(done, {}).update(metrics)
        log.info(
            "step %d | validation loss %.4f | %s%s",
            done,
            metrics["val_loss"],
            " | ".join(details),
            gap_text(metrics),
        )
        return metrics

    def _tasks(self, module, done: int, is_last: bool, result: TrainResult) -> dict:
        """eval.tasks' metrics (eval/<task>/<metric>) when due: every eval.interval steps
        (default train.eval_interval) and at the end."""
        interval = self.config.eval.interval
        if interval is None:
            interval = self.config.train.eval_interval
        if self.downstream is None or not interval or not (done % interval == 0 or is_last):
            return {}
        metrics = self.downstream.evaluate(module)
        result.val_metrics.setdefault(done, {}).update(metrics)
        return metrics

    def ask_hooks(self, done: int, metrics: dict[str, float]) -> str | None:
        """The first reason a hook gives to stop, decided on the main rank and sent to
        every rank, so that all of them stop together."""
        if not self.hooks:
            return None
        reason = None
        if self.env.is_main:
            for hook in self.hooks:
                reason = hook(done, metrics)
                if reason:
                    break
        if self.env.world_size > 1:
            box = [reason]
            dist.broadcast_object_list(box, src=0)
            reason = box[0]
        return reason or None
