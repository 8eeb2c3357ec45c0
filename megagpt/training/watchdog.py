"""Detect a hung training step, dump every thread's Python stack, and exit.

A rank blocked in a collective (a peer died, a NCCL hang, a stuck data read) would
otherwise hold the whole allocation until SLURM's time limit. Every rank runs its own
watchdog, so every stuck rank prints where it is stuck:

    watchdog = Watchdog(multiple=10, min_timeout_s=300)
    for step in ...:
        with watchdog.step():
            ...forward, backward, optimizer step...
    watchdog.close()

A step may take `multiple` times the median of the recent steps, but never less than
`min_timeout_s`; until `warmup_steps` steps are timed (the first ones compile and warm
caches) the limit is `first_step_timeout_s`. Past it, the watchdog thread writes the
stacks to stderr (the job log) with `faulthandler` and ends the process with
WATCHDOG_EXIT_CODE, which the sbatch template requeues like a preemption.

The process-group timeout (`MEGAGPT_COLLECTIVE_TIMEOUT_S`, see megagpt.contract)
is the backstop outside watched steps; keep it longer than the watchdog's limit so that
inside a step the watchdog fires first and leaves stacks instead of a bare abort.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TextIO

from megagpt.contract import WATCHDOG_EXIT_CODE

log = logging.getLogger(__name__)


class Watchdog:
    """A thread that ends the process when a step runs far longer than usual.

    Args:
        multiple: A step may take this many times the median recent step time.
        min_timeout_s: Lower bound of the limit, so noise on fast steps never fires it.
        first_step_timeout_s: The limit until `warmup_steps` steps have been timed.
        warmup_steps: Steps whose time is not trusted for the median (compilation).
        history: How many recent step times the median is taken over.
        exit_code: The process exit status when the watchdog fires.
        stream: Where the report and stacks go; must have a file descriptor.
    """

    def __init__(
        self,
        multiple: float = 10.0,
        min_timeout_s: float = 300.0,
        first_step_timeout_s: float = 1800.0,
        warmup_steps: int = 2,
        history: int = 100,
        exit_code: int = WATCHDOG_EXIT_CODE,
        stream: TextIO | None = None,
    ):
        for name, value in (
            ("multiple", multiple),
            ("min_timeout_s", min_timeout_s),
            ("first_step_timeout_s", first_step_timeout_s),
        ):
            if value <= 0:
                raise ValueError(f"Watchdog {name} = {value}: must be positive")
        self.multiple = multiple
        self.min_timeout_s = min_timeout_s
        self.first_step_timeout_s = first_step_timeout_s
        self.warmup_steps = warmup_steps
        self.exit_code = exit_code
        self.stream = stream or sys.stderr
        self._durations: deque[float] = deque(maxlen=history)
        self._steps_seen = 0
        self._started_at: float | None = None
        self._deadline: float | None = None
        self._closed = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="megagpt-watchdog", daemon=True)
        self._thread.start()

    def timeout_s(self) -> float:
        """The limit the next step gets."""
        if self._steps_seen < self.warmup_steps or not self._durations:
            return self.first_step_timeout_s
        return max(self.min_timeout_s, self.multiple * statistics.median(self._durations))

    @property
    def armed(self) -> bool:
        """Whether a step is being watched now."""
        return self._deadline is not None

    def step_started(self) -> None:
        with self._condition:
            self._started_at = time.monotonic()
            self._deadline = self._started_at + self.timeout_s()
            self._condition.notify()

    def step_finished(self) -> None:
        with self._condition:
            if self._started_at is None:
                return
            duration = time.monotonic() - self._started_at
            if self._steps_seen >= self.warmup_steps:
                self._durations.append(duration)
            self._steps_seen += 1
            self._started_at = self._deadline = None
            self._condition.notify()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Watch the body as one step. A step that raises is not timed."""
        self.step_started()
        try:
            yield
        except BaseException:
            with self._condition:
                self._started_at = self._deadline = None
            raise
        self.step_finished()

    def close(self) -> None:
        """Stop watching; the thread ends."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                elapsed = time.monotonic() - self._started_at
                dump_stacks_and_exit(
                    f"step running for {elapsed:.0f}s, over the watchdog limit of "
                    f"{self.timeout_s():.0f}s",
                    self.exit_code,
                    self.stream,
                )


def dump_stacks_and_exit(reason: str, exit_code: int, stream: TextIO | None = None) -> None:
    """Write `reason` and every thread's Python stack to `stream`, then end the process.

    Every line carries a `[rank N]` prefix and is written whole: all ranks of a hung
    job tend to fire together into the same job log, and faulthandler's many small
    writes would otherwise interleave mid-line, leaving stacks no one can attribute.

    `os._exit` rather than `sys.exit`: the main thread is blocked (in a collective, an
    I/O call), so nothing that needs it (exception unwinding, atexit, process-group
    teardown) can run.
    """
    stream = stream or sys.stderr
    rank = os.environ.get("RANK", "0")
    header = (
        f"megagpt watchdog: rank {rank} (pid {os.getpid()}): {reason}; "
        f"Python stacks of all threads follow, then exit code {exit_code}\n"
    )
    try:
        report = header + _all_thread_stacks()
        for line in report.splitlines(True):
            stream.write(f"[rank {rank}] {line}")
            stream.flush()  # one write per line: lines under PIPE_BUF never tear
    except OSError:  # no room for the temporary file: unprefixed, but still the stacks
        stream.write(header)
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.flush()
    os._exit(exit_code)


def _all_thread_stacks() -> str:
    # faulthandler writes to a file descriptor only, and is the one dumper that does
    # not need the blocked main thread's cooperation.
    with tempfile.TemporaryFile("w+") as dump:
        faulthandler.dump_traceback(file=dump, all_threads=True)
        dump.seek(0)
        return dump.read()
