"""Who this process is (rank, world size, device) and the default process group."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from megagpt.config.errors import ConfigError

            raise ConfigError(
                "train.device = 'cuda', but torch sees no CUDA device; use train.device=cpu or auto"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: int = 600) -> DistributedEnv:
    """Join the process group that torchrun (RANK/WORLD_SIZE/MASTER_ADDR) describes.

    A single process without those variables runs without a process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        owns = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistributedEnv(rank, world_size, local_rank, device, owns)


def shutdown_distributed(env: DistributedEnv) -> None:
    """Leave the process group we created. The barrier first: without it gloo ranks
    sometimes abort at exit ("terminate called without an active exception")."""
    if env.owns_process_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
