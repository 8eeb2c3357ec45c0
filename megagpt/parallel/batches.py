"""What one step reads and how it is seeded: microbatches by global sample index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from megagpt.config import Config, ConfigError
from megagpt.data import global_sample_indices
from megagpt.model.gpt import IGNORE_INDEX
from megagpt.parallel.context_parallel import positions_for_rank, split_for_context_parallel
from megagpt.utils.seeds import derive_key

if TYPE_CHECKING:  # the train module reads its batches through here
    from megagpt.parallel.train_module import TrainModule


@dataclass
class Microbatch:
    """What the model reads for one microbatch, all (B, T): input ids, the ids to
    predict (IGNORE_INDEX where nothing is trained: prompts, padding), and for packed
    fine-tuning examples their positions and example numbers (see GPT.forward)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # classification: (B,), IGNORE_INDEX for none
    label_positions: torch.Tensor | None = None  # the token each row is classified at

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The packing inputs, for the model's forward (nothing for plain text)."""
        return {
            name: value
            for name, value in (("positions", self.positions), ("segments", self.segments))
            if value is not None
        }

    def supervised_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def labeled_rows(self) -> int:
        return 0 if self.labels is None else int((self.labels != IGNORE_INDEX).sum())

    def context_share(self, cp_rank: int, cp_size: int) -> Microbatch:
        """This context-parallel rank's share of every sequence (its head and tail
        chunks, see context_parallel.py), with the global positions of its tokens, which
        the model's learned or rotary positions then index."""
        if cp_size == 1:
            return self
        if self.segments is not None or self.labels is not None:
            raise ConfigError(
                "parallel.context_parallel_size > 1 trains on plain text only: packed "
                "fine-tuning examples and classification batches need their own attention "
                "masks; use parallel.context_parallel_size=1 for fine-tuning"
            )
        B, T = self.inputs.shape
        positions = positions_for_rank(T, cp_rank, cp_size, self.inputs.device)
        return Microbatch(
            inputs=split_for_context_parallel(self.inputs, 1, cp_rank, cp_size),
            targets=split_for_context_parallel(self.targets, 1, cp_rank, cp_size),
            positions=positions.expand(B, -1),  # per row: pipelines split along the batch
        )


def load_microbatch(dataset, indices, vocab_size: int, device: torch.device) -> Microbatch:
    """The microbatch of the given global sample indices: windows of seq_len + 1 tokens
    of a text corpus, or packed examples of a fine-tuning set (`dataset.microbatch`)."""
    if hasattr(dataset, "microbatch"):
        arrays = dataset.microbatch(indices)  # inputs, targets, positions, segments
    else:
        tokens = dataset.samples(indices)
        arrays = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    top = int(arrays["inputs"].max())
    if top >= vocab_size:
        raise ConfigError(
            f"{dataset.name} holds token id {top}, but model.vocab_size = "
            f"{vocab_size}; set model.vocab_size to the tokenizer's size"
        )
    return Microbatch(
        **{
            name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64)).to(
                device, non_blocking=True
            )
            for name, value in arrays.items()
        }
    )


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
    """This replica's microbatches of global batch `step` (this rank's share of their
    sequences under context parallelism)."""
    cp, cp_rank = model.dims.cp, model.dims.cp_rank(model.env.rank)
    return [
        load_microbatch(dataset, indices, config.model.vocab_size, model.env.device).context_share(
            cp_rank, cp
        )
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
