"""How many times a run reads each training dataset, and data.max_epochs.

A run reads train.max_steps x train.global_batch_size samples of the training split.
A blend takes its datasets' samples in proportion to their weights (see blend.py), so
a small dataset with a large weight can be read many times while the split as a whole
is read less than once: the count that matters for overfitting is per dataset. This
one computation serves the start-up check of every run (text corpora and fine-tuning
sets alike) and megagpt-build-index's report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megagpt.config.errors import ConfigError
from megagpt.config.schema import DataConfig
from megagpt.data.dataset import BlendedDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetEpochs:
    """What a run reads of one dataset of its training split."""

    name: str
    """The dataset (<prefix>:train for a corpus, the split's name for a fine-tuning set)."""
    share: float
    """Its share of the split's samples (1 unless blended)."""
    samples_per_epoch: int
    samples_read: float
    """share x the samples the run reads."""

    @property
    def epochs(self) -> float:
        return self.samples_read / max(1, self.samples_per_epoch)


def epochs_read(split, samples: int) -> list[DatasetEpochs]:
    """What reading `samples` samples of `split` (a dataset or a blend) reads of each
    of its datasets."""
    if isinstance(split, BlendedDataset):
        shares = split.schedule.units / split.schedule.units.sum()
        return [
            DatasetEpochs(part.name, float(share), len(part), float(share) * samples)
            for part, share in zip(split.datasets, shares)
        ]
    return [DatasetEpochs(getattr(split, "name", "train"), 1.0, len(split), float(samples))]


def check_epochs(cfg: DataConfig, split, samples: int) -> list[DatasetEpochs]:
    """Log the epochs a run reads of each training dataset; past data.max_epochs, warn,
    or raise ConfigError with data.max_epochs_action=error.

    Args:
        cfg: The data settings (max_epochs, max_epochs_action).
        split: The training split: a dataset, or a BlendedDataset of several.
        samples: The samples the run reads (train.max_steps x train.global_batch_size).

    Returns:
        The count of every dataset of the split.
    """
    counts = epochs_read(split, samples)
    for count in counts:
        log.info(
            "data: the run reads %s samples of %s (%s per epoch): %.3g epochs",
            f"{round(count.samples_read):,}",
            count.name,
            f"{count.samples_per_epoch:,}",
            count.epochs,
        )
    limit = cfg.max_epochs
    over = [c for c in counts if limit is not None and c.epochs > limit]
    if not over:
        return counts
    message = (
        f"data.max_epochs = {limit:g}: the run would read "
        + "; ".join(f"{c.name} {c.epochs:.3g} times" for c in over)
        + f" (train.max_steps x train.global_batch_size = {samples:,} samples"
        + (", shared by the blend's weights" if len(counts) > 1 else "")
        + "), which invites overfitting; lower train.max_steps (or train.epochs), add "
        "data or lower its weight in data.path, or raise data.max_epochs (null: no check)"
    )
    if cfg.max_epochs_action == "error":
        raise ConfigError(message)
    log.warning("%s; training anyway (data.max_epochs_action=warn)", message)
    return counts
