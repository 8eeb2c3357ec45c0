"""Writing a file so that a crash at any moment leaves either the old one or the new one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through a `.partial` sibling: written, flushed, fsynced,
    then renamed over `path` (a rename within a directory is atomic on POSIX)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    mode, encoding = ("wb", None) if isinstance(data, bytes) else ("w", "utf-8")
    with open(temporary, mode, encoding=encoding) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def fsync_directory(path: str | Path) -> None:
    """Make the renames and new entries in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
