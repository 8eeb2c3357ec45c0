"""Saving and resuming during training.

Every rank writes its own shards with torch.distributed.checkpoint (DCP), in a
background thread when checkpoint.async_save is on; the next save (or the end of
training) waits for the previous one. Global rank 0 publishes a checkpoint (see
layout.publish) once DCP reports every rank's shards written.

What training waits for depends on where the state lives. On GPUs, DCP first copies
it to host memory (fast), and training continues once the copy is made. On CPU that
copy would be a memcpy of the whole state, as slow as a good disk; instead the writer
reads the live tensors, which nothing changes until the next optimizer step (forward
and backward only write gradients), and training waits at that step if the write is
still running (`before_update`).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from megagpt.checkpoint import layout
from megagpt.checkpoint.layout import CheckpointError
from megagpt.checkpoint.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, read_index
from megagpt.checkpoint.state import apply, check_fits, collect, stored_name
from megagpt.config import Config, save_config
from megagpt.parallel.optimizer import Optimizers
from megagpt.parallel.train_module import TrainModule

log = logging.getLogger(__name__)
# DCP warns that it "assumes a single process" whenever there is no process group.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")


class _LiveStateStager(AsyncStager):
    """Hands DCP the live state instead of a copy (see the module docstring)."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Pending:
    future: Future | None
    step: int
    partial: Path
    metadata: dict[str, Any]
    started: float
    blocked_s: float
    live: bool  # the writer reads live tensors: wait before they change


class Checkpointer:
    def __init__(
        self,
        config: Config,
        module: TrainModule,
        root: Path,
        is_main: bool,
    ):
        self.config, self.module = config, module
        self.root, self.is_main = root, is_main
        self._pending: _Pending | None = None
        self.last_step: int | None = None  # the step of the newest save started
        # Background writes run their collectives on a group of their own, so they
        # never interleave with the training loop's collectives.
        self._group = dist.new_group(backend="gloo")
        if is_main:
            root.mkdir(parents=True, exist_ok=True)
            layout.remove_incomplete(root)
        _barrier()

    # ------------------------------------------------------------------ save
    def save(self, step: int, metadata: dict[str, Any]) -> None:
        """Start saving the current state as checkpoint `step` (returns before the
        files are written when checkpoint.async_save is on)."""
        self.wait()
        self.last_step = step
        partial = layout.partial_dir(self.root, step)
        if self.is_main:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            save_config(self.config, partial / "config.yaml")
            tokenizer = self.config.data.tokenizer
            if tokenizer and Path(tokenizer).is_file():
                shutil.copyfile(tokenizer, partial / "tokenizer.model")
        _barrier()
        started = time.perf_counter()
        state = collect(self.module.parts, self.module.optimizers)
        writer = FileSystemWriter(partial / layout.STATE_DIR, thread_count=4)
        info = {**layout.base_metadata(step), "optimizer_state": True, **metadata}
        if self.config.checkpoint.async_save:
            live = self.module.env.device.type == "cpu"
            stager = _LiveStateStager() if live else None
            future = dcp.async_save(
                state, storage_writer=writer, process_group=self._group, async_stager=stager
            )
            blocked = time.perf_counter() - started
            self._pending = _Pending(future, step, partial, info, started, blocked, live)
            log.info(
                "step %d | checkpoint: training blocked %.2fs %s; writing in the background",
                step,
                blocked,
                "to plan the write" if live else "while the state was copied to host",
            )
        else:
            dcp.save(state, storage_writer=writer, process_group=self._group)
            blocked = time.perf_counter() - started
            self._pending = _Pending(None, step, partial, info, started, blocked, False)
            self.wait()

    def before_update(self) -> None:
        """Call before the optimizer changes the state: a save still reading the live
        tensors is finished first (and the wait counted as blocking time)."""
        if self._pending is not None and self._pending.live:
            started = time.perf_counter()
            self._pending.future.result()
            self._pending.blocked_s += time.perf_counter() - started

    def wait(self) -> Path | None:
        """Finish the save in flight, if any; return the published directory."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.future is not None:
            pending.future.result()
        _barrier(self._group)  # every rank's shards are on disk
        total = time.perf_counter() - pending.started
        final = self.root / layout.step_dir_name(pending.step)
        if self.is_main:
            final = layout.publish(pending.partial, self.root, pending.step, pending.metadata)
            cfg = self.config.checkpoint
            for old in layout.apply_retention(self.root, cfg.keep_last, cfg.keep_every):
                log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", old, cfg.keep_last)
        _barrier(self._group)
        log.info(
            "step %d | checkpoint %s complete: %.2fs in total, %.2fs of it blocking training",
            pending.step,
            final,
            total,
            pending.blocked_s,
        )
        return final

    # ------------------------------------------------------------------ load
    def resume_point(self) -> Path | None:
        """The checkpoint that checkpoint.resume selects, or None to start fresh."""
        resume = self.config.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            return layout.find_latest(self.root)
        return layout.resolve_checkpoint_dir(resume)

    def load(self, directory: Path) -> dict[str, Any]:
        """Load model and optimizer state (any layout) and return the checkpoint's
        metadata (step, consumed samples, ...)."""
        metadata = layout.read_metadata(directory)
        # An imported checkpoint has weights only: the optimizer starts fresh.
        optimizers = self.module.optimizers if metadata.get("optimizer_state", True) else None
        load_state(self.module.parts, optimizers, directory, self.config.model.tie_embeddings)
        return metadata


def _barrier(group=None) -> None:
    dist.barrier(group=group)


def load_state(
    parts: list[nn.Module], optimizers: Optimizers | None, directory: Path, tie_embeddings: bool
) -> None:
    """Fill the model `parts` (and `optimizers`, if given) from the checkpoint in
    `directory`. Without optimizers (inference, export) no process group is needed.

    DCP loads tensors in place into the state dict we pass, resharding them for this
    layout; entries are requested under the names they were stored with.
    """
    state_dir = directory / layout.STATE_DIR
    stored = {
        k: getattr(v, "size", None) for k, v in read_index(state_dir).state_dict_metadata.items()
    }
    state = collect(parts, optimizers) if optimizers is not None else {"model": _model_state(parts)}
    check_fits(state, stored, directory)
    request, missing = {}, []
    for section, entries in state.items():
        for key, value in entries.items():
            if section == "optimizer" and not key.startswith("state."):
                continue  # hyperparameters come from the current config
            name = stored_name(f"{section}.{key}", stored, tie_embeddings)
            if name is not None:
                request[name] = value
            elif section != "rng":  # RNG states only carry over to the same layout
                missing.append(f"{section}.{key}")
    if missing:
        raise CheckpointError(
            f"{directory} lacks {len(missing)} entries this run needs: "
            + ", ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    dcp.load(request, storage_reader=SafeFileSystemReader(state_dir), planner=SafeLoadPlanner())
    if optimizers is not None:
        apply(parts, optimizers, state)
        return
    for part in parts:
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))


def _model_state(parts: list[nn.Module]) -> dict:
    state = {}
    for part in parts:
        state.update(get_model_state_dict(part))
    return state
