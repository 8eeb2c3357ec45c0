"""Who this process is (rank, world size, device) and the default process group."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megagpt.config.errors import ConfigError
from megagpt.contract import COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S

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
            raise ConfigError(
                "train.device = 'cuda', but torch sees no CUDA device; use train.device=cpu or auto"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    device_preference: str = "auto", timeout_s: int = 600, cpu_collectives: bool = False
) -> DistributedEnv:
    """Join the process group that torchrun (RANK/WORLD_SIZE/MASTER_ADDR) describes, or
    the one the caller already made.

    `cpu_collectives` adds gloo beside NCCL on GPUs, for collectives on host tensors:
    with CPU offload the gradients (their norm, tied copies) live in host memory.

    A lone process (no MASTER_ADDR, WORLD_SIZE unset or 1) gets a process group of one
    rank over an in-memory store (no network), so that one process is a layout of size
    one and runs the code every other layout runs.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and cpu_collectives:
            backend = "cuda:nccl,cpu:gloo"
        timeout = timedelta(seconds=timeout_s)
        lone = "MASTER_ADDR" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == 1
        if lone:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
        owns = True
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def shutdown_distributed(env: DistributedEnv) -> None:
    """Leave the process group we created. The barrier first: without it gloo ranks
    sometimes abort at exit ("terminate called without an active exception")."""
    if env.owns_process_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def collective_timeout_s(environ: Mapping[str, str] | None = None) -> int:
    """The process-group timeout the launcher chose (MEGAGPT_COLLECTIVE_TIMEOUT_S), or
    the default when no launcher set it.

    Raises:
        ConfigError: the variable is set but not a positive whole number of seconds.
    """
    env = os.environ if environ is None else environ
    raw = env.get(COLLECTIVE_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"{COLLECTIVE_TIMEOUT_ENV} = {raw!r}: expected a positive number of seconds, "
            f"e.g. {DEFAULT_COLLECTIVE_TIMEOUT_S}"
        )
    return value
