"""Loading a checkpoint into one process, for generation, evaluation and export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from megagpt.checkpoint import lora
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
from megagpt.model.lora import apply_lora, merge_lora


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
    if config.finetune.lora.rank:
        apply_lora(model, config.finetune.lora)
    load_weights([model], directory, config)
    model.eval()
    return model, config, metadata


def load_weights(parts: list[nn.Module], directory: Path, config: Config) -> None:
    """Fill the model `parts` (any layout) from checkpoint `directory`: its weights, or
    for a LoRA checkpoint its base's weights (checked unchanged) and the adapters."""
    record = lora.record_of(directory, config.finetune.lora)
    if record is None:
        load_state(parts, None, directory, config.model)
        return
    base = lora.check_base(directory, record)
    problems = checkpoint_problems(base)
    if problems:
        raise damaged_error(base, problems)
    load_state(parts, None, base, config.model)
    lora.load_adapters(parts, None, directory, config.model, config.finetune.lora)


def consolidated_state_dict(
    path: str | Path, merge_adapters: bool = False
) -> tuple[dict[str, torch.Tensor], Config]:
    """The checkpoint's weights as one state dict (keys as GPT.state_dict()). A LoRA
    checkpoint gives its base's weights and the adapters (`...lora_A`, `...lora_B`),
    or with `merge_adapters` the base's keys only, holding W + (alpha / rank) B A."""
    model, config, _ = load_model_for_inference(path)
    if merge_adapters:
        merge_lora(model)
    return {k: v.detach() for k, v in model.state_dict().items()}, config
