"""One writer per output: an exclusive lock that dies with the process holding it.

Two runs writing into one directory (or two preprocessing jobs into one prefix)
silently mix their files. The lock is `flock` on a small file beside the output,
which the kernel releases when the holder exits, however it exits (SIGKILL, a node
reboot on a local disk): a lock left behind by a dead process is never in the way,
and a SLURM requeue takes it back at once. The file also records who holds it (host,
pid, start time, SLURM job), so a refused second run can name the holder, and a run
that finds the record of a holder no longer there says it took over.

On NFS, Linux implements flock with the server's POSIX locks: it works across
machines, and a crashed client's lock is freed when the server notices (a lease,
about 90 s).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from megagpt.errors import MegagptError

log = logging.getLogger(__name__)


class RunLockedError(MegagptError):
    """Another process writes the same output."""


class RunLock:
    """Hold `path` (created if needed) exclusively for as long as this object lives.

    Args:
        path: The lock file, e.g. <output_dir>/.megagpt.lock.
        what: The kind of job, for messages ("training run", "megagpt-preprocess").
        hint: What the refused user can do, e.g. "choose another train.output_dir".
        wait_s: How long to wait for a holder to finish before refusing: 0 for a second
            writer (refuse at once), more for a short turn that each process takes.
    """

    def __init__(self, path: str | Path, what: str, hint: str, wait_s: float = 0):
        self.path = Path(path)
        self.what, self.hint = what, hint
        self.wait_s = wait_s
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # read-only, a file where the directory should be
            raise MegagptError(
                f"cannot write {self.path} ({error.strerror}): the {self.what} needs a "
                f"writable directory; {self.hint}"
            ) from None
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)  # polled, not blocking: a lost NFS holder can't hang us
                    continue
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another {self.what}: {describe(holder)}; "
                    f"wait for it to finish or stop it, or {self.hint}"
                ) from None
        previous = _read_holder(fd)
        if previous:
            log.info(
                "%s: took over the lock of a %s that is no longer running (%s)",
                self.path,
                self.what,
                describe(previous),
            )
        record = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "slurm_job": os.environ.get("SLURM_JOB_ID"),
            }
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up; the record is cleared, so the next holder takes over quietly."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    """'pid 123 on node01, started ..., SLURM job 42', from a lock file's record."""
    if not holder:
        return "holder unknown"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("slurm_job"):
        text += f", SLURM job {holder['slurm_job']}"
    return text
