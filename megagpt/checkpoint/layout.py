"""How checkpoints sit on disk, and what makes one complete.

    <root>/step_00000600/
        state/             torch.distributed.checkpoint shards: model, optimizer, RNG
        config.yaml        the resolved config of the run that wrote it
        tokenizer.model    a copy of the tokenizer, so the directory stands alone: a
                           sentencepiece model, or tokenizer.json (with the
                           tokenizer_config.json it was read with, if any)
        metadata.json      step, consumed samples/tokens, loss, layout, versions
    <root>/latest          the name of the newest complete checkpoint
    <root>/best            with checkpoint.keep_best: the name of the checkpoint with
                           the best value of that metric (see best.py)

A checkpoint is written under `.step_00000600.partial/`; metadata.json is its last
file, and the directory gets its real name by an atomic rename after every rank has
finished. A crash at any moment leaves either the previous state or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import megagpt
from megagpt.config import Config, save_config
from megagpt.errors import MegagptError
from megagpt.tokenizer import tokenizer_files
from megagpt.utils.files import atomic_write, fsync_directory

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
LATEST = "latest"
BEST = "best"
STATE_DIR = "state"
METADATA = "metadata.json"
TOKENIZER = "tokenizer.model"
"""The copy of a sentencepiece tokenizer (the only kind before tokenizer.json)."""
TOKENIZER_FILES = (TOKENIZER, "tokenizer.json", "tokenizer_config.json")
"""Every name a tokenizer copy may have (see megagpt.tokenizer.tokenizer_files)."""
CHAT_TEMPLATE = "chat_template.json"
"""The copy of the chat template a fine-tune was trained with (data.chat_template)."""


class CheckpointError(MegagptError):
    """A checkpoint is missing, incomplete, from a newer megagpt, or does not fit."""


def base_metadata(step: int) -> dict[str, Any]:
    """The fields every checkpoint's metadata.json starts with."""
    import time

    import torch

    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "megagpt_version": megagpt.__version__,
        "torch_version": torch.__version__,
    }


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    return root / f".{step_dir_name(step)}.partial"


def start_partial(root: Path, step: int, config: Config) -> Path:
    """A fresh `.step_N.partial/` holding the run's config and a copy of its tokenizer;
    the state/ shards and metadata.json come after."""
    partial = partial_dir(root, step)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    save_config(config, partial / "config.yaml")
    tokenizer = config.data.tokenizer
    if tokenizer and Path(tokenizer).is_file():
        for name, source in tokenizer_files(tokenizer).items():
            shutil.copyfile(source, partial / name)
    template = config.data.chat_template
    if template and Path(template).is_file():
        shutil.copyfile(template, partial / CHAT_TEMPLATE)
    return partial


def tokenizer_copy(directory: Path) -> dict[str, Path]:
    """The files of the checkpoint's copy of its tokenizer, by name (empty if none)."""
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def tokenizer_file(directory: Path) -> Path | None:
    """The checkpoint's copy of its tokenizer, of either kind, if it has one."""
    copy = tokenizer_copy(directory)
    return copy.get(TOKENIZER, copy.get(TOKENIZER_FILES[1]))


def delete(directory: Path) -> None:
    """Remove a checkpoint so that no half-deleted directory keeps its real name: it is
    first renamed (atomically) to a hidden name, then deleted."""
    doomed = directory.with_name(f".{directory.name}.deleting")
    os.replace(directory, doomed)
    shutil.rmtree(doomed)


def publish(partial: Path, root: Path, step: int, metadata: dict[str, Any]) -> Path:
    """Make a fully written checkpoint visible: metadata, rename, then `latest`."""
    atomic_write(partial / METADATA, json.dumps(metadata, indent=2) + "\n")
    fsync_directory(partial)
    final = root / step_dir_name(step)
    if final.exists():  # an earlier run of the same step, now superseded
        delete(final)
    os.replace(partial, final)
    fsync_directory(root)
    atomic_write(root / LATEST, final.name + "\n")
    return final


def apply_retention(
    root: Path, keep_last: int, keep_every: int, protected: tuple[str, ...] = ()
) -> list[Path]:
    """Delete complete checkpoints beyond the newest keep_last (0: keep all), except
    those whose step is a multiple of keep_every and those named in `protected` (the
    best one); return what was deleted."""
    if keep_last <= 0:
        return []
    complete = sorted(p for p in root.glob("step_*") if (p / METADATA).is_file())
    deleted = []
    for old in complete[:-keep_last]:
        step = int(old.name.split("_")[1])
        if (keep_every and step % keep_every == 0) or old.name in protected:
            continue
        delete(old)
        deleted.append(old)
    return deleted


def remove_incomplete(root: Path) -> list[Path]:
    """Delete what an interrupted save or deletion left behind."""
    removed = []
    for path in [*root.glob(".step_*.partial"), *root.glob(".step_*.deleting")]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for pointer in (LATEST, BEST):
        stale_pointer = root / f"{pointer}.partial"
        if stale_pointer.exists():
            stale_pointer.unlink()
            removed.append(stale_pointer)
    for path in removed:
        log.warning("removed an incomplete checkpoint left by an interrupted save: %s", path)
    return removed


def _pointed_to(root: Path, name: str = LATEST) -> Path | None:
    """The checkpoint the pointer `name` (latest, best) names, if it names one of this
    root's step directories; anything else (a path elsewhere, `..`) is refused rather
    than followed."""
    pointer = root / name
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not re.fullmatch(r"step_\d{8}", name):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a checkpoint directory of {root} "
            "(step_NNNNNNNN); restore it or delete it (the newest checkpoint is then used)"
        )
    return root / name


def checkpoints_newest_first(root: Path) -> list[Path]:
    """Complete checkpoints under `root`: the one `latest` names, then by step, newest
    first."""
    complete = sorted((p for p in root.glob("step_*") if (p / METADATA).is_file()), reverse=True)
    pointed = _pointed_to(root)
    if pointed is not None and pointed in complete:
        complete.remove(pointed)
        complete.insert(0, pointed)
    return complete


def point_best(root: Path, step: int) -> None:
    """Make the `best` pointer name checkpoint `step` (written atomically, as latest)."""
    atomic_write(root / BEST, step_dir_name(step) + "\n")


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is gone."""
    candidates = checkpoints_newest_first(root)
    return candidates[0] if candidates else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory, a checkpoints root, a run's output directory, or
    a pointer file in a checkpoints root (checkpoints/best, checkpoints/latest)."""
    path = Path(path)
    if path.name in (LATEST, BEST) and path.is_file():
        pointed = _pointed_to(path.parent, path.name)
        if pointed is not None and (pointed / METADATA).is_file():
            return pointed
    for candidate in (path, path / "checkpoints"):
        if (candidate / METADATA).is_file():
            return candidate
        if candidate.is_dir():
            latest = find_latest(candidate)
            if latest is not None:
                return latest
    raise CheckpointError(
        f"no checkpoint at {path}: expected a directory with {METADATA}, or a checkpoints "
        f"directory holding one (give a run's output_dir, its checkpoints/, or a step_N/)"
    )


def read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; {directory} is not a complete checkpoint"
        ) from None
    except ValueError:
        raise CheckpointError(f"{path} is not valid JSON (cut short or damaged)") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} does not hold a JSON object (damaged)")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format {version!r}, written by megagpt "
            f"{metadata.get('megagpt_version')}; this megagpt {megagpt.__version__} reads "
            f"format {FORMAT_VERSION} only: upgrade megagpt to load it"
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format {version}, from before sharded "
            f"checkpoints; this megagpt {megagpt.__version__} reads format {FORMAT_VERSION} "
            f"only (export it with megagpt {metadata.get('megagpt_version')}, which wrote it)"
        )
    return metadata
