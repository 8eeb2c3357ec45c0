"""Data parallelism and ZeRO through FSDP2, on the ("dp_replicate", "dp_shard_cp") mesh
(the shard dimension flattened with the context-parallel one, see dims.py).

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

CPU offload (ZeRO-Offload, FSDP2's CPUOffloadPolicy) at any stage: each rank's sharded
fp32 parameters, their gradients and so the optimizer state live in host memory, and
the optimizer steps there; only the gathered copies a forward or backward computes
with are on the device, copied over before each all-gather and freed as at the stage.
So offloading "the optimizer" and "the parameters" is one setting on this engine.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from megagpt.model.gpt import GPT

OFFLOAD_DESCRIPTION = (
    "CPU offload (sharded parameters, gradients and optimizer state in host memory, "
    "optimizer stepped there; parallel.offload_optimizer and offload_params both mean "
    "this on the native engine)"
)


def apply_data_parallel(
    part: GPT,
    mesh: DeviceMesh,
    zero_stage: int,
    cpu_offload: bool = False,
    pin_memory: bool = False,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Wrap every block, then the root, in FSDP2 (with the same offload policy: FSDP2
    moves each group's shards on its own). `pin_memory` speeds host-device copies; only
    CUDA has pinned memory. With expert parallelism (`expert_mesh`, see dims.py) the
    routed experts are wrapped first, over the ranks that hold the same experts, so
    their block's group leaves them out."""
    dp_mesh = mesh["dp_replicate", "dp_shard_cp"]
    offload = CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else OffloadPolicy()
    if expert_mesh is not None:
        for moe in part.moe_layers:
            fully_shard(
                moe.experts,
                mesh=expert_mesh["dp_replicate", "efsdp"],
                reshard_after_forward=zero_stage == 3,
                offload_policy=offload,
            )
    for block in part.layers.values():  # one communication group per block
        fully_shard(
            block, mesh=dp_mesh, reshard_after_forward=zero_stage == 3, offload_policy=offload
        )
    # The root (embeddings, final norm, output layer) is needed again as soon as
    # backward starts, so it stays gathered through the step, as in torchtitan.
    fully_shard(part, mesh=dp_mesh, reshard_after_forward=False, offload_policy=offload)


@torch.no_grad()
def move_buffers(part: GPT, device: torch.device) -> None:
    """Put `part`'s buffers (rotary tables) on the compute device. FSDP2 manages only
    parameters: an offloaded part is allocated on the CPU, as FSDP2 requires, and its
    buffers would stay there."""
    for module in part.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)


def sync_every_microbatch(zero_stage: int) -> bool:
    """Whether gradients are reduced after each microbatch (else once per step)."""
    return zero_stage >= 2
