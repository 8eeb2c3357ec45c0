"""Compute precision: bf16 or fp16 autocast with fp32 weights and optimizer state, or
fp32. fp16 also needs loss scaling (see loss_scale.py), which the train module applies."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from megagpt.config import Config

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype autocast computes in, by precision (fp32: autocast off)."""


def resolve_precision(config: Config, device: torch.device) -> str:
    """train.precision with "auto" resolved: bf16 on GPUs that support it, else fp32."""
    precision = config.train.precision
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16_ok else "fp32"
    return precision


def autocast_dtype(precision: str) -> torch.dtype:
    """The dtype activations come out in under `precision`."""
    return AUTOCAST_DTYPES.get(precision, torch.float32)


def autocast_for(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context every forward pass runs in."""
    dtype = AUTOCAST_DTYPES.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    return autocast
