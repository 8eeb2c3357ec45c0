"""Phase 2 of a deduplicated job: duplicates found across all tasks, a partition at a time.

Each partition holds the keys of every task whose top bits name it. Sorted by (key,
document id), each run of equal keys keeps its first document, the earliest in input
order, and marks the others: as duplicates for content hashes, as near duplicates for
MinHash band keys. A document is thus a near duplicate when one of its band keys was
held by an earlier document, which is what one process reading the corpus in order
and remembering every band key it has seen would decide; so a job of N tasks keeps
the documents one process keeps, and every removed document has an earlier one in
the corpus that shares an LSH band with it.

Marks are one byte per input record, in one file per kind (record r of file f at
offset[f] + r), written through memory maps: partitions can be processed by several
processes at once (marks are only ever set to 1) and in any order, and a restarted
phase redoes only the partitions without a done marker.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from data_tools.reasons import Reason
from data_tools.scan import KEY_DTYPES, RECORD_BITS
from data_tools.sources import InputError
from data_tools.state import atomic_write_json, read_json
from data_tools.tasks import JobLayout
from megagpt.utils.formatting import format_duration

log = logging.getLogger(__name__)

MARK_REASONS = {"exact": Reason.DUPLICATE, "near": Reason.NEAR_DUPLICATE}
_COUNT_CHUNK = 64 << 20


def run_dedup(
    layout: JobLayout, kinds, partitions: int, workers: int, log_interval: float = 30.0
) -> dict:
    """Mark the duplicates of the whole job; returns (and writes) its done marker."""
    started = time.perf_counter()
    scans = _finished_scans(layout)
    records = np.array([n for scan in scans for n in scan["records"]], dtype=np.int64)
    offsets = np.r_[np.int64(0), np.cumsum(records)]
    layout.dedup_directory.mkdir(parents=True, exist_ok=True)
    offsets_path = layout.dedup_directory / "offsets.npy"
    np.save(offsets_path, offsets)
    total = int(offsets[-1])
    for kind in kinds:
        _prepare_marks(layout.marks_path(kind), total)
    todo = [
        (kind, p) for kind in kinds for p in range(partitions)
        if not layout.partition_marker(kind, p).exists()
    ]  # fmt: skip
    if len(todo) < len(kinds) * partitions:
        log.info(
            "dedup: resuming with %d of %d partitions left", len(todo), len(kinds) * partitions
        )
    jobs = [
        (layout.prefix, layout.num_tasks, kind, p, str(offsets_path), total) for kind, p in todo
    ]
    progress = _PartitionProgress(len(jobs), log_interval)
    for kind, partition, entries, marked in _map(_dedup_partition, jobs, workers):
        atomic_write_json(
            layout.partition_marker(kind, partition), {"entries": entries, "marked": marked}
        )
        progress.update(entries)
    counts = _count_marks(layout, kinds, total)
    done = {
        "records": total,
        "documents": sum(scan["documents"] for scan in scans),
        **counts,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(layout.dedup_done, done)
    log.info(
        "dedup: %s documents, %s exact and %s near duplicates marked in %s",
        f"{done['documents']:,}",
        f"{counts['duplicates']:,}",
        f"{counts['near_duplicates']:,}",
        format_duration(done["seconds"]),
    )
    return done


def _finished_scans(layout: JobLayout) -> list[dict]:
    missing = [t for t in range(layout.num_tasks) if not layout.scan_done(t).exists()]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(
            f"the scan phase has not finished for task(s) {shown} of {layout.num_tasks}: run "
            "`--phase scan` for them first (with the same arguments), then `--phase dedup`"
        )
    return [read_json(layout.scan_done(t)) for t in range(layout.num_tasks)]


def _prepare_marks(path: Path, total: int) -> None:
    """A zero byte per record (a sparse file); kept as it is on a resume."""
    if path.exists() and path.stat().st_size == total:
        return
    with open(path, "wb") as f:
        f.truncate(total)


def _map(function, jobs: list, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(function, jobs)
        return
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(function, jobs)


def _dedup_partition(job) -> tuple[str, int, int, int]:
    """Sort one partition of every task's keys and mark all but the first document of
    each run of equal keys. Runs in a worker process."""
    prefix, num_tasks, kind, partition, offsets_path, total = job
    layout = JobLayout(prefix, num_tasks)
    entries = np.concatenate(
        [
            np.fromfile(layout.partition_path(task, kind, partition), dtype=KEY_DTYPES[kind])
            for task in range(num_tasks)
        ]
    )
    if kind == "exact":
        order = np.lexsort((entries["id"], entries["low"], entries["high"]))
        high, low = entries["high"][order], entries["low"][order]
        repeated = (high[1:] == high[:-1]) & (low[1:] == low[:-1])
    else:
        order = np.lexsort((entries["id"], entries["key"]))
        keys = entries["key"][order]
        repeated = keys[1:] == keys[:-1]
    ids = entries["id"][order][1:][repeated]
    if len(ids):
        offsets = np.load(offsets_path)
        files = (ids >> np.uint64(RECORD_BITS)).astype(np.int64)
        records = (ids & np.uint64((1 << RECORD_BITS) - 1)).astype(np.int64)
        marks = np.memmap(layout.marks_path(kind), dtype=np.uint8, mode="r+", shape=(total,))
        marks[offsets[files] + records] = 1
        marks.flush()
        del marks
    return kind, partition, len(entries), len(np.unique(ids))


def _count_marks(layout: JobLayout, kinds, total: int) -> dict:
    """Documents removed as exact duplicates, and as near duplicates only."""
    counts = {"duplicates": 0, "near_duplicates": 0}
    if not total:
        return counts
    maps = {kind: np.memmap(layout.marks_path(kind), dtype=np.uint8, mode="r") for kind in kinds}
    for start in range(0, total, _COUNT_CHUNK):
        exact = maps["exact"][start : start + _COUNT_CHUNK] != 0 if "exact" in maps else None
        if exact is not None:
            counts["duplicates"] += int(exact.sum())
        if "near" in maps:
            near = maps["near"][start : start + _COUNT_CHUNK] != 0
            counts["near_duplicates"] += int(
                (near & ~exact).sum() if exact is not None else near.sum()
            )
    return counts


class DuplicateMarks:
    """The dedup phase's verdicts, read by the tokenize phase a batch at a time."""

    def __init__(self, layout: JobLayout, kinds, first_file: int):
        self.first_file = first_file
        self.offsets = np.load(layout.dedup_directory / "offsets.npy")
        total = int(self.offsets[-1])
        self.maps = {
            kind: np.memmap(layout.marks_path(kind), dtype=np.uint8, mode="r", shape=(total,))
            for kind in kinds
            if total
        }

    def drop_reasons(self, file_index: int, first_record: int, count: int) -> np.ndarray:
        """A Reason code per record of a batch of the task's file `file_index`: 0 to
        keep, DUPLICATE or NEAR_DUPLICATE (an exact duplicate is counted as such)."""
        codes = np.zeros(count, dtype=np.int64)
        start = int(self.offsets[self.first_file + file_index]) + first_record
        for kind in ("near", "exact"):  # exact last: it wins
            if kind in self.maps:
                codes[self.maps[kind][start : start + count] != 0] = MARK_REASONS[kind]
        return codes


class _PartitionProgress:
    def __init__(self, total: int, interval: float):
        self.total, self.interval = total, interval
        self.done = self.entries = 0
        self.started = self.last = time.perf_counter()

    def update(self, entries: int) -> None:
        self.done += 1
        self.entries += entries
        now = time.perf_counter()
        if now - self.last < self.interval and self.done < self.total:
            return
        self.last = now
        elapsed = max(1e-9, now - self.started)
        eta = (self.total - self.done) * elapsed / self.done
        log.info(
            "dedup: %d of %d partitions, %s keys/s, ETA %s",
            self.done,
            self.total,
            f"{self.entries / elapsed:,.0f}",
            format_duration(eta),
        )


def default_partitions(total_input_bytes: int) -> int:
    """Partitions per kind: one per 512 MB of input (a power of two, at most 4096), so
    that a partition of keys stays around 100-250 MB whatever the corpus size."""
    wanted = max(1, -(-total_input_bytes // (512 << 20)))
    return min(4096, 1 << (wanted - 1).bit_length())
