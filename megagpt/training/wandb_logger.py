"""Weights & Biases logging beside TensorBoard (logging.wandb), through MetricsSink.

The W&B run lives in <train.output_dir>/wandb. Its id is kept in
<train.output_dir>/wandb/run_id, so a resumed training run continues the same W&B run.
With WANDB_MODE=offline nothing leaves the machine: the run is written to disk and can
be uploaded later with `wandb sync <train.output_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from megagpt.config import Config, ConfigError, config_to_dict

log = logging.getLogger(__name__)

RUN_ID_FILE = "run_id"


@dataclass(frozen=True)
class WandbOptions:
    """What MetricsSink needs to open a W&B run."""

    project: str
    name: str
    directory: Path
    config: dict


def wandb_options(config: Config) -> WandbOptions | None:
    """The W&B settings of a run, or None when logging.wandb is off."""
    settings = config.logging
    if not settings.wandb:
        return None
    output = Path(config.train.output_dir)
    return WandbOptions(
        project=settings.wandb_project,
        name=settings.wandb_name or output.resolve().name,
        directory=output / "wandb",
        config=config_to_dict(config),
    )


class WandbWriter:
    """One W&B run: numbers logged by step, finished on close."""

    def __init__(self, options: WandbOptions):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "logging.wandb = true needs the wandb package: pip install 'megagpt[wandb]' "
                "(or set logging.wandb=false)"
            ) from None
        options.directory.mkdir(parents=True, exist_ok=True)
        id_file = options.directory / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n", encoding="utf-8")
        # wandb writes into <dir>/wandb; its parent is the run's output directory.
        self.run = wandb.init(
            project=options.project,
            name=options.name,
            id=run_id,
            resume="allow",
            dir=str(options.directory.parent),
            config=options.config,
            reinit="finish_previous",  # several runs in one process (a local search)
        )
        mode = os.environ.get("WANDB_MODE", "online")
        log.info("W&B run %s (%s, %s) in %s", run_id, options.project, mode, options.directory)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        numbers = {
            key: value
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        }
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()
