"""Apply parallelism to a plain GPT, one logged step at a time."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megagpt.config import Config
from megagpt.parallel.env import DistributedEnv

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, config: Config, env: DistributedEnv) -> nn.Module:
    """Data parallel across all ranks (gradients averaged by DDP), then compile."""
    if env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
        log.info("data parallel: %d replicas (DDP)", env.world_size)
    if config.train.compile:
        model = torch.compile(model)
        log.info("compiled the model with torch.compile")
    return model
