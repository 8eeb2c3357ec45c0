"""Loading a checkpoint into one process, for generation, evaluation and export."""

from __future__ import annotations

from pathlib import Path

import torch

from megagpt.checkpoint.checksums import checkpoint_problems, damaged_error
from megagpt.checkpoint.layout import (
    CHAT_TEMPLATE,
    read_metadata,
    resolve_checkpoint_dir,
    tokenizer_file,
)
from megagpt.checkpoint.manager import load_state
from megagpt.config import Config, load_config
from megagpt.model import build_model


def checkpoint_config(directory: Path) -> Config:
    config = load_config(directory / "config.yaml")
    tokenizer = tokenizer_file(directory)
    if tokenizer is not None:
        config.data.tokenizer = str(tokenizer)
    if (directory / CHAT_TEMPLATE).is_file():
        config.data.chat_template = str(directory / CHAT_TEMPLATE)
    return config


def load_model_for_inference(path: str | Path, device: torch.device | str = "cpu"):
    """Build the checkpoint's model on `device`, whatever layout saved it, and load
    its weights; returns (model in eval mode, config, metadata)."""
    directory = resolve_checkpoint_dir(path)
    problems = checkpoint_problems(directory)
    if problems:
        raise damaged_error(directory, problems)
    metadata = read_metadata(directory)
    config = checkpoint_config(directory)
    model = build_model(config.model, device, seed=None)
    load_state([model], None, directory, config.model)
    model.eval()
    return model, config, metadata


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """The checkpoint's weights as one state dict (keys as GPT.state_dict())."""
    model, config, _ = load_model_for_inference(path)
    return {k: v.detach() for k, v in model.state_dict().items()}, config
