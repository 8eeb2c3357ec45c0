"""Progress of a long tool run: a tqdm bar on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from megagpt.utils.formatting import format_duration

log = logging.getLogger(__name__)


class Progress:
    """Tracks input bytes and documents; shows documents/s, MB/s and the ETA."""

    def __init__(
        self,
        total_bytes: int,
        done_bytes: int = 0,
        log_interval: float = 30.0,
        bar: bool | None = None,
        desc: str = "preprocess",
    ):
        self.total = total_bytes
        self.start_bytes = self.done = done_bytes
        self.documents = 0
        self.started = self._last_log = time.perf_counter()
        self.log_interval = log_interval
        self._bar = None
        if sys.stderr.isatty() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                dynamic_ncols=True,
                desc=desc,
            )

    def update(self, done_bytes: int, documents: int) -> None:
        advance = max(0, done_bytes - self.done)
        self.done += advance
        self.documents += documents
        elapsed = max(1e-9, time.perf_counter() - self.started)
        docs_per_s = self.documents / elapsed
        if self._bar is not None:
            self._bar.update(advance)
            self._bar.set_postfix_str(f"{docs_per_s:,.0f} docs/s", refresh=False)
        elif time.perf_counter() - self._last_log >= self.log_interval:
            self._last_log = time.perf_counter()
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        rate = (self.done - self.start_bytes) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100 * self.done / max(1, self.total)
        return (
            f"{self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({percent:.0f}%), "
            f"{self.documents / elapsed:,.0f} docs/s, {rate / 1e6:.2f} MB/s, "
            f"ETA {format_duration(eta)}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
