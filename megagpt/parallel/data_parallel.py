"""Data parallelism and ZeRO through FSDP2, on the ("dp_replicate", "dp_shard") mesh.

stage 0: the shard dimension has size 1, so parameters, gradients and optimizer
         state are replicated and gradients all-reduced once per step (plain DDP).
stage 1: sharded over all data-parallel ranks; within a step gradients accumulate
         unsharded and are reduce-scattered once, after the last microbatch; the
         optimizer updates only this rank's shard.
stage 2: as 1, but gradients are reduce-scattered after every microbatch, so only
         gradient shards are kept.
stage 3: as 2, and each block's parameters are freed after its forward and gathered
         again for backward.
FSDP2 keeps parameters sharded between steps at every stage >= 1 (DeepSpeed's
stages 1-2 keep them whole); stage 3 is the one that also frees them within a step.
Under pipeline parallelism the pipeline reduces gradients once per step at all stages.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from megagpt.model.gpt import GPT


def apply_data_parallel(part: GPT, mesh: DeviceMesh, zero_stage: int) -> None:
    dp_mesh = mesh["dp_replicate", "dp_shard"]
    for block in part.layers.values():  # one communication group per block
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=zero_stage == 3)
    # The root (embeddings, final norm, output layer) is needed again as soon as
    # backward starts, so it stays gathered through the step, as in torchtitan.
    fully_shard(part, mesh=dp_mesh, reshard_after_forward=False)


def sync_every_microbatch(zero_stage: int) -> bool:
    """Whether gradients are reduced after each microbatch (else once per step)."""
    return zero_stage >= 2
