"""Construct a whole GPT in one process: on the meta device first, then materialized.

Training builds its (possibly sharded) model through megagpt.parallel.parallelize,
which starts from `build_meta_model` too; this is the constructor of a plain model for
inference, conversion and tests.
"""

from __future__ import annotations

import torch

from megagpt.config.schema import ModelConfig
from megagpt.model.gpt import GPT


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = 0) -> GPT:
    """A GPT on `device`, initialized from `seed` (see GPT.initial_value), or with
    uninitialized weights when `seed` is None, for loading a checkpoint into."""
    model = build_meta_model(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    if seed is None:
        model.reset_buffers()
    else:
        model.init_weights(seed)
    return model


def build_meta_model(cfg: ModelConfig) -> GPT:
    """The model's structure without storage: nothing is allocated."""
    with torch.device("meta"):
        return GPT(cfg)
