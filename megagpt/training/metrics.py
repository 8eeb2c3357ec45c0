"""Where training metrics go: metrics.jsonl, TensorBoard, and the console."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from megagpt.training.wandb_logger import WandbOptions, WandbWriter
from megagpt.utils.files import atomic_write

log = logging.getLogger(__name__)


class MetricsSink:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors every
    number to TensorBoard (and to Weights & Biases with `wandb`). Only the main rank
    writes; elsewhere it does nothing. Each record also holds elapsed_s, the seconds
    since this sink opened (training time of this run; it restarts at 0 on a resume),
    which `megagpt compare` sums into a wall time.

    A resumed run continues after `resume_step`: records of later steps, written by
    the run that was interrupted, move to metrics.superseded.jsonl (nothing is lost)
    and TensorBoard drops its own events after that step.
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        tensorboard: bool,
        resume_step: int | None = None,
        wandb: WandbOptions | None = None,
    ):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.file = None
        self.started = time.perf_counter()
        if not enabled:
            return
        output_dir = Path(output_dir)
        path = output_dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            _split_superseded(path, resume_step)
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)
        if wandb is not None:
            self.wandb = WandbWriter(wandb)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        record["elapsed_s"] = round(time.perf_counter() - self.started, 3)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.write(step, metrics)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def _split_superseded(path: Path, resume_step: int) -> None:
    keep, superseded = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        (keep if json.loads(line).get("step", 0) <= resume_step else superseded).append(line)
    if superseded:
        with open(path.with_name("metrics.superseded.jsonl"), "a", encoding="utf-8") as f:
            f.write("\n".join(superseded) + "\n")
        log.info(
            "resuming after step %d: %d later records moved to %s",
            resume_step,
            len(superseded),
            path.with_name("metrics.superseded.jsonl"),
        )
    atomic_write(path, "".join(line + "\n" for line in keep))


def _plain(value):
    return round(value, 6) if isinstance(value, float) and math.isfinite(value) else value
