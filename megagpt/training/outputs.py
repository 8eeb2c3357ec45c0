"""A run's output directories: created and held by one run at a time.

Two runs writing into one train.output_dir would interleave their metrics and publish
each other's weights under their own step numbers. Rank 0 takes a RunLock on the
output directory (and on checkpoint.dir when that lies outside it) before anything is
written; every rank learns the outcome, so a refused run stops on all ranks at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from megagpt.config import Config, ConfigError
from megagpt.errors import MegagptError
from megagpt.parallel.env import DistributedEnv
from megagpt.utils.run_lock import RunLock

LOCK_FILE = ".megagpt.lock"


def output_directories(config: Config) -> list[tuple[Path, str]]:
    """(directory, the setting that names it) of everything a run writes."""
    output = Path(config.train.output_dir)
    directories = [(output, "train.output_dir")]
    if config.checkpoint.dir:
        checkpoints = Path(config.checkpoint.dir)
        if not checkpoints.resolve().is_relative_to(output.resolve()):
            directories.append((checkpoints, "checkpoint.dir"))
    return directories


def make_directory(path: Path, key: str) -> None:
    """Create `path` (and its parents), or a ConfigError naming the setting and why.
    Whether it is writable, the lock file created in it next tells."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{key} = {path}: a file is in the way; choose a directory") from None
    except OSError as error:
        raise ConfigError(
            f"{key} = {path}: cannot create it ({error.strerror}: {error.filename})"
        ) from None


@contextlib.contextmanager
def locked_outputs(config: Config, env: DistributedEnv) -> Iterator[None]:
    """Hold the output directories for the duration of the block (rank 0 holds the
    locks; every rank raises if rank 0 could not get them)."""
    locks: list[RunLock] = []
    error: MegagptError | None = None
    if env.is_main:
        try:
            for directory, key in output_directories(config):
                make_directory(directory, key)
                lock = RunLock(directory / LOCK_FILE, "training run", f"choose another {key}")
                locks.append(lock.acquire())
        except MegagptError as failure:
            error = failure
    try:
        _raise_on_every_rank(error, env)
        yield
    finally:
        for lock in locks:
            lock.release()


def _raise_on_every_rank(error: MegagptError | None, env: DistributedEnv) -> None:
    message = [None if error is None else str(error)]
    if env.world_size > 1:
        dist.broadcast_object_list(message, src=0)  # our own rank 0's string
    if error is not None:
        raise error
    if message[0] is not None:
        raise MegagptError(f"rank 0 stopped the run: {message[0]}")
