"""Pipeline parallelism: cut the model into stages, run them with a PyTorch schedule.

A stage is the GPT with the other stages' layers removed: the first keeps the
embeddings, the last the final norm and the output layer, so parameter names are
the same as in the whole model. With virtual stages, rank r holds stages
r, r + pp, r + 2pp, ... (the interleaved schedules' "loop" placement).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules

from megagpt.model.gpt import GPT

log = logging.getLogger(__name__)

SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
}


def layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, balanced by count (earlier stages get the extra ones)."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for stage in range(n_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def stage_ids(pp_rank: int, pp_size: int, virtual_stages: int) -> list[int]:
    return [pp_rank + k * pp_size for k in range(virtual_stages)]


def split_model(model: GPT, stages: list[int], n_stages: int) -> list[GPT]:
    """One copy of the (meta) model per stage, holding only that stage's modules."""
    ranges = layer_ranges(model.config.n_layers, n_stages)
    parts = []
    for stage in stages:
        part = copy.deepcopy(model)
        keep = {str(i) for i in ranges[stage]}
        for name in list(part.layers):
            if name not in keep:
                del part.layers[name]
        if stage != 0:
            part.embed_tokens = part.embed_positions = None
        if stage != n_stages - 1:
            part.final_norm = part.lm_head = None
        parts.append(part)
        log.info(
            "pipeline stage %d/%d: layers %d-%d%s%s",
            stage,
            n_stages,
            ranges[stage][0],
            ranges[stage][-1],
            " + embeddings" if stage == 0 else "",
            " + output layer" if stage == n_stages - 1 else "",
        )
    return parts


def build_schedule(
    parts: list[GPT],
    stages: list[int],
    n_stages: int,
    schedule: str,
    microbatches: int,
    device: torch.device,
    group,
    loss_fn,
):
    """The torch.distributed.pipelining schedule over this rank's stages; `loss_fn`
    (output, target) gives each microbatch's loss, already scaled for the step."""
    pipeline_stages = [
        PipelineStage(part, stage, n_stages, device, group=group)
        for part, stage in zip(parts, stages)
    ]
    cls = getattr(torch_schedules, SCHEDULES[schedule])
    # The train module scales every microbatch's summed loss by dp / N before the step,
    # so the gradients summed over microbatches need no further division.
    target = pipeline_stages if len(pipeline_stages) > 1 else pipeline_stages[0]
    return cls(target, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
