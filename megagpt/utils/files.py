"""Writing a file so that a crash at any moment leaves either the old one or the new one."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def filesystem_of(path: str | Path) -> str:
    """The device and mount point holding `path`, e.g. "/dev/vda1 (mounted at /data)"."""
    target = os.path.realpath(path)
    best = ("?", "/")
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                device, mount_point = line.split()[:2]
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best[1]):
                    best = (device, mount_point)
    except OSError:  # not Linux
        return f"the file system of {path}"
    return f"{best[0]} (mounted at {best[1]})"


def out_of_space(error: BaseException, path: str | Path) -> bool:
    """Whether `error` (or one it wraps, as DCP's per-rank failures) comes from a full
    disk: ENOSPC, or a short write (torch's "unexpected pos") with almost no room left."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, tuple):  # DCP keeps (exception, traceback) per rank
            stack.extend(item for item in current if isinstance(item, BaseException))
            continue
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current):
            return True
        if "unexpected pos" in str(current) and _free_bytes(path) < 64 << 20:
            return True
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        stack.extend([current.__cause__, current.__context__])
    return False


def _free_bytes(path: str | Path) -> int:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
