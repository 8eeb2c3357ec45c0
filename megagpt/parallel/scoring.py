"""Scoring sequences for evaluation on any layout: per-row log-likelihoods.

A row's targets are IGNORE_INDEX except where its tokens are scored; for each row this
returns the summed log-probability of the scored targets and whether each of them was
the model's argmax (greedy decoding would have produced it). Rows are the training
microbatches' shape, so pipelines run them with their training schedule: the last stage
computes the row statistics in place of the loss. Every rank gets every row's result:
the ranks that computed them (the last stage's first tensor-parallel rank of each
data-parallel replica) contribute them to one all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megagpt.model.gpt import IGNORE_INDEX

if TYPE_CHECKING:
    from megagpt.parallel.batches import Microbatch
    from megagpt.parallel.train_module import TrainModule


def row_statistics(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, 2): summed log-probability of each row's scored targets, and 1.0 where every
    scored target is the argmax."""
    if isinstance(logits, DTensor):  # vocabulary-sharded under tensor parallelism
        logits = logits.full_tensor()
    logprobs = logits.float().log_softmax(-1)  # (B, T, V)
    scored = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    greedy = (logprobs.argmax(-1) == targets) | ~scored
    return torch.stack([(picked * scored).sum(-1), greedy.all(-1).float()], dim=-1)


@torch.no_grad()
def score_rows(module: TrainModule, batches: list[Microbatch]) -> torch.Tensor | None:
    """This rank's rows' statistics, in microbatch order (None where another rank
    computes them: stages before the last)."""
    if module.schedule is not None:
        module.pipeline_loss.score_rows = True
        try:
            module.train(False)
            inputs = torch.cat([b.inputs for b in batches]) if module.has_first_stage else None
            args = (inputs,) if inputs is not None else ()
            losses: list[torch.Tensor] = []
            kwargs = {}
            if module.has_last_stage:
                kwargs = {"target": torch.cat([b.targets for b in batches]), "losses": losses}
            with module.autocast():
                module.schedule.eval(*args, **kwargs)
        finally:
            module.pipeline_loss.score_rows = False
            module.train(True)
        return torch.cat(losses) if module.has_last_stage else None
    module.train(False)
    rows = []
    for batch in batches:
        with module.autocast():
            logits = module.parts[0](batch.inputs, **batch.model_kwargs())
        rows.append(row_statistics(logits, batch.targets))
    module.train(True)
    return torch.cat(rows)


def gather_rows(module: TrainModule, local: torch.Tensor | None, indices: np.ndarray, total: int):
    """Every row's statistics (total, 2) on every rank, from each rank's share."""
    everything = torch.zeros(total, 2, dtype=torch.float64, device=module.env.device)
    owner = local is not None and module.dims.tp_rank(module.env.rank) == 0
    if owner:
        keep = indices < total  # rows past the end are padding of the last step
        everything[torch.as_tensor(indices[keep], device=everything.device)] = local[
            torch.as_tensor(keep, device=local.device)
        ].to(everything)
    if module.dims.world_size > 1:
        dist.all_reduce(everything)
    return everything
