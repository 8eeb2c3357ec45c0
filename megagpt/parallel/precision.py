"""Compute precision: bf16 autocast with fp32 weights and optimizer state, or fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from megagpt.config import Config


def resolve_precision(config: Config, device: torch.device) -> str:
    """train.precision with "auto" resolved: bf16 on GPUs that support it, else fp32."""
    precision = config.train.precision
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16_ok else "fp32"
    return precision


def autocast_for(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context every forward pass runs in."""

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    return autocast
