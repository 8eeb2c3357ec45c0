"""An XXH3-64 hash and the size of every checkpoint file, computed as it is written.

DCP has no integrity check: a flipped byte inside a shard loads as a wrong weight (a
NaN, or a finite value nothing notices), and a truncated shard fails deep inside
torch.load. Here DCP writes through a file system that checksums every stream in the
writer threads, overlapping the disk, so no second pass reads the data back; the sums
go into metadata.json, and loading verifies every file against them first.

XXH3-64 (the xxhash package, ~12 GB/s on one core here, against ~3 GB/s for zlib's
CRC-32, which cost 13-22% of the save throughput in benchmarks/checkpoint.py) misses a
random corruption with probability 2^-64; it guards against damage, not against someone
who rewrites both a shard and metadata.json.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from megagpt.checkpoint.layout import (
    CHAT_TEMPLATE,
    METADATA,
    CheckpointError,
    checkpoints_newest_first,
    read_metadata,
    tokenizer_copy,
)

CHUNK = 8 << 20
HASH = "xxh3_64"


class _ChecksummingStream:
    """A write-only stream that passes bytes through and keeps their hash and count."""

    def __init__(self, raw):
        self.raw, self.hasher, self.nbytes = raw, xxhash.xxh3_64(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.nbytes += view.nbytes
        return self.raw.write(view)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


class ChecksummingFileSystem(FileSystem):
    """DCP's local file system, recording {path: sum} of every file written."""

    def __init__(self):
        super().__init__()
        self.sums: dict[str, dict] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            counted = _ChecksummingStream(stream)
            yield counted
            with self._lock:
                self.sums[str(path)] = summary(counted.nbytes, counted.hasher.hexdigest())

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if str(path) in self.sums:
                self.sums[str(new_path)] = self.sums.pop(str(path))

    def relative_sums(self, directory: Path) -> dict[str, dict]:
        """The sums recorded so far, keyed by path relative to `directory`."""
        with self._lock:
            return {str(Path(p).relative_to(directory)): s for p, s in self.sums.items()}


class ChecksummingWriter(FileSystemWriter):
    """DCP's FileSystemWriter over a ChecksummingFileSystem (its sums: `self.fs`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fs = ChecksummingFileSystem()


def checkpoint_sums(directory: Path, shard_sums: list[dict[str, dict]]) -> dict[str, dict]:
    """The checksums metadata.json records: every rank's state/ files, as written, and
    the copies of the tokenizer and chat template. config.yaml is left out on purpose:
    it is text people may edit (paths on another machine), and damage to it fails
    parsing or the shape check."""
    sums = {name: s for part in shard_sums for name, s in part.items()}
    for name, path in tokenizer_copy(directory).items():
        sums[name] = file_summary(path)
    if (directory / CHAT_TEMPLATE).is_file():
        sums[CHAT_TEMPLATE] = file_summary(directory / CHAT_TEMPLATE)
    return dict(sorted(sums.items()))


def summary(nbytes: int, digest: str) -> dict:
    return {"bytes": nbytes, HASH: digest}


def file_summary(path: Path) -> dict:
    """The size and hash of a file on disk, read in 8 MiB chunks."""
    hasher, nbytes = xxhash.xxh3_64(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            nbytes += len(chunk)
    return summary(nbytes, hasher.hexdigest())


def verify_files(directory: Path, sums: dict[str, dict], names: list[str]) -> list[str]:
    """Problems of the files `names` (keys of `sums`) under `directory`, in words."""
    problems = []
    for name in names:
        path, expected = directory / name, sums[name]
        try:
            size = path.stat().st_size
            if size != expected["bytes"]:
                problems.append(f"{path}: {size:,} bytes, but {expected['bytes']:,} were written")
            elif file_summary(path)[HASH] != expected.get(HASH):
                problems.append(f"{path}: its bytes differ from those written ({HASH} mismatch)")
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except OSError as error:
            problems.append(f"{path}: cannot be read ({error.strerror})")
    return problems


def checkpoint_problems(directory: Path, rank: int = 0, world_size: int = 1) -> list[str] | None:
    """What is wrong with the checkpoint in `directory`, checking this rank's share of
    its files (every world_size-th, from `rank`): [] if intact, None if it predates
    checksums (format 2 before 2026-12; then only its metadata is checked)."""
    try:
        metadata = read_metadata(directory)
    except CheckpointError as error:
        return [str(error)]
    sums = metadata.get("checksums")
    if sums is None:
        return None
    return verify_files(directory, sums, sorted(sums)[rank::world_size])


def damaged_error(directory: Path, problems: list[str]) -> CheckpointError:
    shown = "; ".join(problems[:5]) + (
        f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    )
    return CheckpointError(
        f"{directory} is damaged: {shown}. Restore the files from a copy, or use another "
        "checkpoint (checkpoint.resume=auto falls back to the newest intact one)"
    )


def verify_checkpoints(path: str | Path) -> list[tuple[Path, list[str] | None]]:
    """(checkpoint, its problems) for the checkpoint at `path`, or for every complete
    checkpoint under a checkpoints root or a run directory, newest first."""
    path = Path(path)
    if (path / METADATA).is_file():
        directories = [path]
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        directories = checkpoints_newest_first(root) if root.is_dir() else []
    if not directories:
        raise CheckpointError(
            f"no checkpoint at {path}: give a step_N/ directory, a checkpoints/ root or "
            "a run's output_dir"
        )
    return [(d, checkpoint_problems(d)) for d in directories]
