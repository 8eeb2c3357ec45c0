"""Phase 1 of a deduplicated job: each task's keys, spread over hash partitions.

For every document of the task's files that passes cleaning and the filters, the
scan writes its 128-bit content hash (for exact duplicates) and, with --near-dedup,
its MinHash band keys, each with the document's id (file index << 40 | record). A
key goes to the partition named by its top bits, so the dedup phase can read one
partition of every task at a time: its memory is that of one partition, whatever
the corpus size.

Resuming: after each input file, the sizes of all partition files are recorded in
that file's marker. A restarted task cuts the partition files back to the last
marker's sizes and continues with the next file, so a killed and restarted scan
writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from data_tools.reasons import Reason
from data_tools.state import atomic_write_json, read_json
from data_tools.tasks import JobLayout
from data_tools.worker import Result

log = logging.getLogger(__name__)

RECORD_BITS = 40  # a document id is file index << 40 | record number in the file
EXACT_DTYPE = np.dtype([("high", "<u8"), ("low", "<u8"), ("id", "<u8")])
NEAR_DTYPE = np.dtype([("key", "<u8"), ("id", "<u8")])
KEY_DTYPES = {"exact": EXACT_DTYPE, "near": NEAR_DTYPE}
_FLUSH_BYTES = 32 << 20  # keys buffered before they are appended to the partition files


def document_ids(global_file: int, first_record: int, records: np.ndarray) -> np.ndarray:
    return (np.uint64(global_file) << np.uint64(RECORD_BITS)) | (
        records.astype(np.uint64) + np.uint64(first_record)
    )


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of each uint64 key: its top log2(partitions) bits."""
    if partitions == 1:
        return np.zeros(len(keys), dtype=np.int64)
    shift = np.uint64(64 - (partitions.bit_length() - 1))
    return (keys >> shift).astype(np.int64)


class ScanOutput:
    """Consumes a task's scan results in input order; owns its partition files."""

    def __init__(self, layout: JobLayout, task: int, files: range, partitions: int, kinds):
        self.layout, self.task, self.files = layout, task, files
        self.partitions, self.kinds = partitions, tuple(kinds)
        self._buffers = {kind: [[] for _ in range(partitions)] for kind in self.kinds}
        self._buffered = 0
        self._records = 0  # of the current file
        self._reasons = np.zeros(len(Reason), dtype=np.int64)
        self.documents = 0
        self.keys = 0

    def resume_position(self) -> int:
        """The local index of the first file to scan, after cutting the partition files
        back to where the last finished file left them."""
        directory = self.layout.scan_directory(self.task)
        done = 0
        while (
            done < len(self.files) and self.layout.scan_marker(self.task, self.files[done]).exists()
        ):
            done += 1
        sizes = (
            read_json(self.layout.scan_marker(self.task, self.files[done - 1]))["sizes"]
            if done
            else {kind: [0] * self.partitions for kind in self.kinds}
        )
        try:
            for kind in self.kinds:
                for partition, size in enumerate(sizes[kind]):
                    path = self.layout.partition_path(self.task, kind, partition)
                    if path.exists() and path.stat().st_size < size:
                        raise ValueError(f"{path} is shorter than its marker records")
                    with open(path, "ab") as f:
                        f.truncate(size)
        except (ValueError, KeyError) as error:  # a lost write (a crash, not a kill)
            log.warning("task %d: scan state is damaged (%s); scanning again", self.task, error)
            shutil.rmtree(directory)
            directory.mkdir(parents=True)
            return self.resume_position()
        if done:
            log.info("task %d: resuming the scan after %d finished file(s)", self.task, done)
        return done

    def consume(self, result: Result) -> None:
        if result.error:
            raise RuntimeError(f"a scan worker failed: {result.error}")
        global_file = self.files[result.file_index]
        passed = np.flatnonzero(result.reasons == Reason.OK)
        ids = document_ids(global_file, result.first_record, passed)
        self._records += len(result.reasons)
        self._reasons += np.bincount(result.reasons.astype(np.int64), minlength=len(Reason))
        self.documents += len(passed)
        if "exact" in self.kinds and len(ids):
            halves = np.frombuffer(np.asarray(result.hashes, dtype="S16").tobytes(), "<u8")
            entries = np.empty(len(ids), EXACT_DTYPE)
            entries["high"], entries["low"], entries["id"] = halves[0::2], halves[1::2], ids
            self._route("exact", entries, entries["high"])
        if "near" in self.kinds and len(ids):
            keys = result.band_keys  # (documents, bands)
            entries = np.empty(keys.size, NEAR_DTYPE)
            entries["key"] = keys.reshape(-1)
            entries["id"] = np.repeat(ids, keys.shape[1])
            self._route("near", entries, entries["key"])
        if self._buffered >= _FLUSH_BYTES:
            self._flush()
        if result.end_of_file:
            self._finish_file(global_file)

    def _route(self, kind: str, entries: np.ndarray, keys: np.ndarray) -> None:
        parts = partition_of(keys, self.partitions)
        order = np.argsort(parts, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(parts, minlength=self.partitions))]
        entries = entries[order]
        for partition in np.flatnonzero(np.diff(bounds)):
            self._buffers[kind][partition].append(
                entries[bounds[partition] : bounds[partition + 1]]
            )
        self.keys += len(entries)
        self._buffered += entries.nbytes

    def _flush(self) -> None:
        for kind in self.kinds:
            for partition, pieces in enumerate(self._buffers[kind]):
                if pieces:
                    with open(self.layout.partition_path(self.task, kind, partition), "ab") as f:
                        for piece in pieces:
                            f.write(piece.tobytes())
                    pieces.clear()
        self._buffered = 0

    def _finish_file(self, global_file: int) -> None:
        self._flush()
        sizes = {
            kind: [
                os.path.getsize(self.layout.partition_path(self.task, kind, p))
                for p in range(self.partitions)
            ]
            for kind in self.kinds
        }
        marker = {
            "file": global_file,
            "records": self._records,
            "documents": int(self._reasons[Reason.OK]),
            "drops": {
                Reason(code).label: int(n) for code, n in enumerate(self._reasons) if code and n
            },
            "sizes": sizes,
        }
        atomic_write_json(self.layout.scan_marker(self.task, global_file), marker)
        self._records = 0
        self._reasons[:] = 0


def prepare_scan_directory(layout: JobLayout, task: int, kinds, partitions: int) -> Path:
    directory = layout.scan_directory(task)
    directory.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        for partition in range(partitions):
            layout.partition_path(task, kind, partition).touch()
    return directory


def finish_scan(layout: JobLayout, task: int, files: range, started: float) -> dict:
    """The task's done marker: records per file (the dedup phase numbers documents
    with them) and totals."""
    markers = [read_json(layout.scan_marker(task, f)) for f in files]
    summary = {
        "task": task,
        "files": [files.start, files.stop],
        "records": [m["records"] for m in markers],
        "documents": sum(m["documents"] for m in markers),
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(layout.scan_done(task), summary)
    return summary
