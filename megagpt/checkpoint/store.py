"""A checkpoint directory holding consolidated state, written atomically.

Layout of `<root>/step_00000600/`: model.pt and optimizer.pt (state dicts, loaded
with weights_only=True), config.yaml (the resolved config), metadata.json (step,
time, loss, versions), tokenizer.model (a copy, so the directory stands alone).
`<root>/latest` names the newest complete one. A checkpoint is assembled in a hidden
temporary directory and renamed into place, so a crash never leaves a half-written
directory under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import megagpt
from megagpt.config import Config, load_config, save_config

FORMAT_VERSION = 1
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, from a newer megagpt, or does not fit."""


@dataclass
class LoadedCheckpoint:
    path: Path
    config: Config
    metadata: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    config: Config,
    metadata: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write consolidated state from global rank 0 (the only rank that holds it);
    every rank returns once the checkpoint is complete."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        temporary = root / f".{final.name}.partial"
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
        torch.save(model_state, temporary / "model.pt")
        if optimizer_state is not None:
            torch.save(optimizer_state, temporary / "optimizer.pt")
        save_config(config, temporary / "config.yaml")
        tokenizer = config.data.tokenizer
        if tokenizer and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, temporary / "tokenizer.model")
        info = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "megagpt_version": megagpt.__version__,
            "torch_version": torch.__version__,
            **metadata,
        }
        (temporary / "metadata.json").write_text(json.dumps(info, indent=2) + "\n")
        _fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _write_atomically(root / LATEST, final.name + "\n")
        _apply_retention(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def _apply_retention(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(p for p in root.glob("step_*") if (p / "metadata.json").is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory, a checkpoints root, or a run's output directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "metadata.json").is_file():
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            target = candidate / latest.read_text().strip()
            if (target / "metadata.json").is_file():
                return target
            raise CheckpointError(f"{latest} names {target}, which is not a complete checkpoint")
    raise CheckpointError(
        f"no checkpoint at {path}: expected a directory with metadata.json, or a "
        f"'{LATEST}' file naming one (give a run's output_dir or its checkpoints/)"
    )


def load_checkpoint(path: str | Path, with_optimizer: bool = False) -> LoadedCheckpoint:
    directory = resolve_checkpoint_dir(path)
    metadata = json.loads((directory / "metadata.json").read_text())
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format {version!r}, written by megagpt "
            f"{metadata.get('megagpt_version')}; this megagpt {megagpt.__version__} reads "
            f"format {FORMAT_VERSION} and older: upgrade megagpt to load it"
        )
    config = load_config(directory / "config.yaml")
    if (directory / "tokenizer.model").is_file():
        config.data.tokenizer = str(directory / "tokenizer.model")
    model_state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    optimizer_state = None
    if with_optimizer and (directory / "optimizer.pt").is_file():
        optimizer_state = torch.load(
            directory / "optimizer.pt", map_location="cpu", weights_only=True
        )
    return LoadedCheckpoint(directory, config, metadata, model_state, optimizer_state)


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with an error that lists every mismatched tensor."""
    expected = unwrap(model).state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit the configured model ({len(problems)} tensors): "
            + "; ".join(problems[:20])
            + (" ..." if len(problems) > 20 else "")
        )
    unwrap(model).load_state_dict(state)


def load_model_for_inference(path: str | Path, device: torch.device | str = "cpu"):
    """Build the checkpoint's model on `device`, load its weights, switch to eval.

    Returns (model, config, metadata).
    """
    from megagpt.model.build import build_meta_model

    loaded = load_checkpoint(path)
    model = build_meta_model(loaded.config.model)
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    load_state_checked(model, loaded.model_state, loaded.path)
    model.eval()
    return model, loaded.config, loaded.metadata
