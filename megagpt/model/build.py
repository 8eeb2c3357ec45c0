"""Construct a GPT: on the meta device first (no memory), then materialized."""

from __future__ import annotations

import torch

from megagpt.config.schema import ModelConfig
from megagpt.model.gpt import GPT


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> GPT:
    """Build and initialize a GPT on `device`.

    Construction happens on `meta`, so a model larger than host memory can be sharded
    (by the caller, between `build_meta_model` and `materialize`) before any weight
    exists. The weights depend only on `seed` (see GPT.initial_value).
    """
    return materialize(build_meta_model(cfg), device, seed)


def build_meta_model(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def materialize(model: GPT, device: torch.device | str, seed: int = 0) -> GPT:
    """Allocate the meta model's storage on `device` and initialize it."""
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model
