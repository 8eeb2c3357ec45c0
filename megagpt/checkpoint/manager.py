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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
)

from megagpt.checkpoint import layout, lora
from megagpt.checkpoint.best import BestCheckpoint
from megagpt.checkpoint.checksums import (
    ChecksummingWriter,
    checkpoint_problems,
    checkpoint_sums,
    damaged_error,
)
from megagpt.checkpoint.layout import CheckpointError
from megagpt.checkpoint.safe_dcp import read_index
from megagpt.checkpoint.state import check_fits, collect, load_into, stored_name
from megagpt.config import Config, ModelConfig
from megagpt.model.build import build_meta_model
from megagpt.model.lora import is_adapter
from megagpt.parallel.optimizer import Optimizers
from megagpt.parallel.train_module import TrainModule
from megagpt.tokenizer import tokenizer_files
from megagpt.utils.files import file_sha256, filesystem_of, out_of_space

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
    writer: FileSystemWriter
    metadata: dict[str, Any]
    started: float
    blocked_s: float
    live: bool  # the writer reads live tensors: wait before they change


class Checkpointer:
    """Saves and loads a train module's state under `root` (see the module docstring).

    `checksums=False` writes no per-file XXH3-64 hashes (only benchmarks/checkpoint.py does, to
    measure what checksums cost).
    """

    def __init__(
        self,
        config: Config,
        module: TrainModule,
        root: Path,
        is_main: bool,
        checksums: bool = True,
    ):
        self.config, self.module = config, module
        self.root, self.is_main, self.checksums = root, is_main, checksums
        self._pending: _Pending | None = None
        self.last_step: int | None = None  # the step of the newest save started
        self.lora_record: dict[str, Any] | None = None  # a LoRA run's base (see lora.py)
        keep_best = config.checkpoint.keep_best
        self.best = (
            BestCheckpoint(keep_best, config.checkpoint.keep_best_mode)
            if keep_best and is_main
            else None
        )
        # Background writes run their collectives on a group of their own, so they
        # never interleave with the training loop's collectives.
        self._group = dist.new_group(backend="gloo")
        if is_main:
            root.mkdir(parents=True, exist_ok=True)
            layout.remove_incomplete(root)
        dist.barrier()

    # ------------------------------------------------------------------ save
    def save(self, step: int, metadata: dict[str, Any]) -> None:
        """Start saving the current state as checkpoint `step` (returns before the
        files are written when checkpoint.async_save is on)."""
        self.wait()
        self.last_step = step
        if self.best is not None:  # after the wait: the previous save is published
            self.best.consider(step, metadata.get("metrics") or {})
        partial = layout.partial_dir(self.root, step)
        if self.is_main:
            layout.start_partial(self.root, step, self.config)
        dist.barrier()
        started = time.perf_counter()
        state = collect(self.module.parts, self.module.optimizers)
        writer_type = ChecksummingWriter if self.checksums else FileSystemWriter
        writer = writer_type(partial / layout.STATE_DIR, thread_count=4)
        info = {**layout.base_metadata(step), "optimizer_state": True, **metadata}
        if self.lora_record is not None:
            info[lora.METADATA_KEY] = self.lora_record
        live = self.config.checkpoint.async_save and self.module.env.device.type == "cpu"
        try:
            if self.config.checkpoint.async_save:
                stager = _LiveStateStager() if live else None
                future = dcp.async_save(
                    state, storage_writer=writer, process_group=self._group, async_stager=stager
                )
            else:
                future = None
                dcp.save(state, storage_writer=writer, process_group=self._group)
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            raise self._save_failed(error, step, partial) from None
        blocked = time.perf_counter() - started
        self._pending = _Pending(future, step, partial, writer, info, started, blocked, live)
        if future is None:
            self.wait()
            return
        log.info(
            "step %d | checkpoint: training blocked %.2fs %s; writing in the background",
            step,
            blocked,
            "to plan the write" if live else "while the state was copied to host",
        )

    def before_update(self) -> None:
        """Call before the optimizer changes the state: a save still reading the live
        tensors is finished first (and the wait counted as blocking time)."""
        pending = self._pending
        if pending is not None and pending.live:
            started = time.perf_counter()
            self._written(pending)
            pending.blocked_s += time.perf_counter() - started

    def _written(self, pending: _Pending) -> None:
        """Wait for this rank's shards of `pending` to be on disk."""
        if pending.future is None:
            return
        try:
            pending.future.result()
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            self._pending = None
            raise self._save_failed(error, pending.step, pending.partial) from None

    def wait(self) -> Path | None:
        """Finish the save in flight, if any; return the published directory."""
        pending = self._pending
        if pending is None:
            return None
        self._written(pending)
        self._pending = None
        sums = self._gather_checksums(pending)  # every rank's shards are on disk
        total = time.perf_counter() - pending.started
        final = self.root / layout.step_dir_name(pending.step)
        if self.is_main:
            if sums is not None:
                pending.metadata["checksums"] = sums
            final = layout.publish(pending.partial, self.root, pending.step, pending.metadata)
            self._retain()
        dist.barrier(group=self._group)
        log.info(
            "step %d | checkpoint %s complete: %.2fs in total, %.2fs of it blocking training",
            pending.step,
            final,
            total,
            pending.blocked_s,
        )
        return final

    def is_new_best(self, metrics: dict[str, float]) -> bool:
        """Whether these evaluation metrics beat every checkpoint saved so far by
        checkpoint.keep_best, so that they deserve a save (main rank only)."""
        return self.best is not None and self.best.improves(metrics)

    def _retain(self) -> None:
        """Point `best` at the best checkpoint, then delete what keep_last/keep_every do
        not keep, never the best one (main rank, after a publish)."""
        cfg, best = self.config.checkpoint, self.best
        protected = ()
        if best is not None and best.name and (self.root / best.name / layout.METADATA).is_file():
            layout.point_best(self.root, best.step)
            protected = (best.name,)
        for old in layout.apply_retention(self.root, cfg.keep_last, cfg.keep_every, protected):
            log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", old, cfg.keep_last)

    def _gather_checksums(self, pending: _Pending) -> dict[str, dict] | None:
        """Every rank's file sums, merged on the main rank (None without checksums);
        a collective on the checkpoint group, so it also waits for every rank."""
        mine = pending.writer.fs.relative_sums(pending.partial) if self.checksums else {}
        gathered: list[dict] = [{}] * dist.get_world_size(self._group)
        dist.all_gather_object(gathered, mine, group=self._group)  # our own ranks' dicts
        if not (self.is_main and self.checksums):
            return None
        return checkpoint_sums(pending.partial, gathered)

    def _save_failed(self, error: BaseException, step: int, partial: Path) -> BaseException:
        """The error to raise for a failed save: a one-line CheckpointError when the disk
        is full (the partial checkpoint removed, the previous one named), else `error`."""
        if not out_of_space(error, partial):
            return error
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        previous = layout.find_latest(self.root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "none was saved"
        return CheckpointError(
            f"no space left on {filesystem_of(self.root)} while saving step {step} to "
            f"{self.root}; {kept}. Free space there, or set checkpoint.dir to a larger disk"
        )

    # ------------------------------------------------------------------ load
    def resume_point(self) -> Path | None:
        """The checkpoint that checkpoint.resume selects, or None to start fresh. Every
        candidate is verified against its checksums; with auto, a damaged one is
        skipped (with a warning) for the newest intact one."""
        resume = self.config.checkpoint.resume
        if resume == "none":
            return None
        if resume != "auto":
            directory = layout.resolve_checkpoint_dir(resume)
            problems = self.verify(directory)
            if problems:
                raise damaged_error(directory, problems)
            return directory
        damaged = []
        for directory in layout.checkpoints_newest_first(self.root):
            problems = self.verify(directory)
            if not problems:
                for bad, reasons in damaged:
                    log.warning(
                        "checkpoint.resume=auto: skipping %s, which is damaged (%s); "
                        "resuming from %s, the newest intact checkpoint",
                        bad,
                        "; ".join(reasons[:3]),
                        directory,
                    )
                return directory
            damaged.append((directory, problems))
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.root} to resume from: "
                + "; ".join(f"{d.name}: {r[0]}" for d, r in damaged)
            )
        return None

    def verify(self, directory: Path) -> list[str]:
        """Every problem of `directory`'s files, each rank checking a share of them; the
        same list on every rank."""
        rank, world = dist.get_rank(self._group), dist.get_world_size(self._group)
        mine = checkpoint_problems(directory, rank, world)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine, group=self._group)
        if all(part is None for part in gathered):
            log.warning("%s was written without checksums; its files are not verified", directory)
            return []
        return [problem for part in gathered for problem in part or []]

    def load(self, directory: Path) -> dict[str, Any]:
        """Load model and optimizer state (any layout) and return the checkpoint's
        metadata (step, consumed samples, ...)."""
        metadata = layout.read_metadata(directory)
        self._check_tokenizer(directory)
        if self.best is not None:
            self.best.recover(self.root, int(metadata["step"]))
        self.lora_record = lora.record_of(directory, self.config.finetune.lora)
        if self.lora_record is not None:
            self._load_lora(directory)
            return metadata
        # An imported checkpoint has weights only: the optimizer starts fresh.
        optimizers = self.module.optimizers if metadata.get("optimizer_state", True) else None
        partial = self.config.checkpoint.partial_load
        load_state(self.module.parts, optimizers, directory, self.config.model, partial)
        return metadata

    def _load_lora(self, directory: Path) -> None:
        """A LoRA resume: the base weights from the base checkpoint the adapters were
        trained on (unchanged, intact), then the adapters and their optimizer state."""
        base = lora.check_base(directory, self.lora_record)
        problems = self.verify(base)
        if problems:
            raise damaged_error(base, problems)
        load_state(self.module.parts, None, base, self.config.model)
        parts, optimizers = self.module.parts, self.module.optimizers
        lora.load_adapters(
            parts, optimizers, directory, self.config.model, self.config.finetune.lora
        )

    def load_weights(self, directory: Path) -> None:
        """Load only the model's weights from `directory` (any layout, checksums
        verified): the start of a fine-tune, whose optimizer starts fresh. With LoRA
        they are the frozen base, recorded in every checkpoint of the run."""
        problems = self.verify(directory)
        if problems:
            raise damaged_error(directory, problems)
        self._check_tokenizer(directory)
        lora.refuse_as_init(directory)
        if self.config.finetune.lora.rank:
            self.lora_record = lora.lora_record(directory, self.config.finetune.lora)
        partial = self.config.checkpoint.partial_load
        load_state(
            self.module.parts, None, directory, self.config.model, partial, new_heads=("score.",)
        )

    def _check_tokenizer(self, directory: Path) -> None:
        """A resume must tokenize as the checkpoint's model learned to: the next
        checkpoint would otherwise store the new tokenizer with the old weights."""
        ours, theirs = self.config.data.tokenizer, layout.tokenizer_file(directory)
        if not ours or theirs is None:
            return
        copy = layout.tokenizer_copy(directory)
        stored = {name: file_sha256(path) for name, path in copy.items()}
        given = {name: file_sha256(path) for name, path in tokenizer_files(ours).items()}
        if given != stored:  # a tokenizer_config.json beside it can change the EOD id
            raise CheckpointError(
                f"{directory} was trained with the tokenizer {theirs}, but data.tokenizer = "
                f"{ours} is a different one (the files differ); resume with "
                f"data.tokenizer={theirs}, or start a new run in another train.output_dir"
            )


def load_state(
    parts: list[nn.Module],
    optimizers: Optimizers | None,
    directory: Path,
    model_config: ModelConfig,
    partial: bool = False,
    new_heads: tuple[str, ...] = (),
) -> None:
    """Fill the model `parts` (and `optimizers`, if given) from the checkpoint in
    `directory`. Without optimizers (inference, export) no process group is needed.

    The checkpoint must hold exactly the tensors of the model `model_config` describes,
    whatever part of it this rank holds; with `partial`, only those of the same name
    and shape are loaded (see check_fits) and the optimizer is left fresh.
    DCP loads tensors in place into the state dict we pass, resharding them for this
    layout; entries are requested under the names they were stored with.
    """
    state_dir = directory / layout.STATE_DIR
    stored = {
        k: getattr(v, "size", None) for k, v in read_index(state_dir).state_dict_metadata.items()
    }
    whole = {k: tuple(v.shape) for k, v in build_meta_model(model_config).state_dict().items()}
    tie = model_config.tie_embeddings
    skipped = check_fits(whole, stored, directory, tie, partial, new_heads)
    if skipped:
        optimizers = None
    state = collect(parts, optimizers) if optimizers is not None else {"model": _model_state(parts)}
    request, missing = {}, []
    for section, entries in state.items():
        for key, value in entries.items():
            if section == "optimizer" and not key.startswith("state."):
                continue  # hyperparameters come from the current config
            if section == "model" and (key in skipped or is_adapter(key)):
                continue  # LoRA adapters come from their own checkpoint (lora.py)
            name = stored_name(f"{section}.{key}", stored, tie)
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
    load_into(parts, optimizers, state, request, state_dir)


def _model_state(parts: list[nn.Module]) -> dict:
    state = {}
    for part in parts:
        state.update(get_model_state_dict(part))
    return state
