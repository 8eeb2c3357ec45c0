"""What one step reads and how it is seeded: microbatches by global sample index."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from megagpt.config import Config, ConfigError
from megagpt.data import global_sample_indices
from megagpt.utils.seeds import derive_key

if TYPE_CHECKING:  # the train module reads its batches through here
    from megagpt.parallel.train_module import TrainModule


def load_microbatch(dataset, indices, vocab_size: int, device: torch.device):
    """(inputs, targets) of shape (B, T) for the given global sample indices."""
    tokens = dataset.samples(indices)
    top = int(tokens.max())
    if top >= vocab_size:
        raise ConfigError(
            f"{dataset.name} holds token id {top}, but model.vocab_size = "
            f"{vocab_size}; set model.vocab_size to the tokenizer's size"
        )
    batch = torch.from_numpy(tokens).to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def microbatch_indices(
    step: int, model: TrainModule, config: Config, sample_offset: int = 0
) -> list[np.ndarray]:
    """Global sample indices of each of this replica's microbatches of step `step`.

    `sample_offset` shifts the whole schedule; a run resumed with a different global
    batch size uses it to continue at the sample where the checkpoint stopped.
    """
    t = config.train
    microbatches = t.global_batch_size // (t.micro_batch_size * model.dp_size)
    return [
        sample_offset
        + global_sample_indices(
            step, m, model.dp_rank, model.dp_size, t.micro_batch_size, t.global_batch_size
        )
        for m in range(microbatches)
    ]


def step_batches(dataset, step: int, model: TrainModule, config: Config, sample_offset: int = 0):
    """This replica's microbatches of global batch `step`."""
    return [
        load_microbatch(dataset, indices, config.model.vocab_size, model.env.device)
        for indices in microbatch_indices(step, model, config, sample_offset)
    ]


def dropout_seed(seed: int, first_sample: int) -> int:
    """The random seed of the microbatch that starts at global sample `first_sample`.

    A microbatch holds the same samples in every layout with the same
    micro_batch_size, so data-parallel and ZeRO runs draw the dropout masks a single
    process draws, and so does tensor parallelism without sequence parallelism and
    with attention_dropout 0 (its dropouts act on whole, replicated tensors). Sequence
    parallelism, attention dropout over head shards, and pipelines (seeded once per
    step) draw different, equally distributed masks. Resuming needs no RNG state.
    """
    return derive_key(seed, first_sample)
