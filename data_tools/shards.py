"""The writing end of megagpt-preprocess: results in stream order become shards.

Results arrive in input order. Here duplicates are dropped (first occurrence wins,
so the output does not depend on worker timing; or, in a job's tokenize phase, the
documents its dedup phase marked), bad records are counted or, with
strict, raised, and tokens go to the current shard. A shard ends at the end of its
input file, or after the document that brings it to `shard_tokens` tokens; it is
then finalized and marked done (see state.py), in that order.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from data_tools.dedup import HASH_DTYPE, DedupIndex
from data_tools.global_dedup import DuplicateMarks
from data_tools.reasons import Reason, count_reasons
from data_tools.state import RunState
from data_tools.stats import Counts
from data_tools.worker import Result
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.errors import MegagptError

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5


class BadRecordError(MegagptError):
    """A bad input record under --strict; the message names file and line."""


class ShardedOutput:
    """Consumes results in order; owns the shard being written."""

    def __init__(
        self,
        state: RunState,
        files: list[Path],
        dtype: np.dtype,
        shard_tokens: int | None,
        dedup: DedupIndex | DuplicateMarks | None,
        strict: bool,
        first_shard: int,
    ):
        self.state, self.files, self.dtype = state, files, dtype
        self.shard_tokens, self.dedup, self.strict = shard_tokens, dedup, strict
        self.shard = first_shard
        self.run_counts = Counts()  # this run only; finished shards' counts are in markers
        self._writer: IndexedDatasetWriter | None = None
        self._hashes_file = None
        self._counts = Counts()
        self._shown = Counter()  # examples logged per reason
        self._files_in_shard: set[int] = set()

    def consume(self, result: Result) -> None:
        if result.error:
            raise RuntimeError(f"a tokenizer worker failed: {result.error}")
        reasons = result.reasons.astype(np.int64)
        passed = np.flatnonzero(reasons == Reason.OK)
        duplicate = self._duplicates(result, passed)
        keep = duplicate == 0
        reasons[passed[~keep]] = duplicate[~keep]
        self._report_bad_records(result, reasons)
        kept_records = passed[keep]
        lengths, hashes = result.lengths[keep], result.hashes[keep]
        text_bytes = result.text_bytes[keep]
        tokens = result.tokens if keep.all() else result.tokens[np.repeat(keep, result.lengths)]
        ends = np.cumsum(lengths)

        record, kept = 0, 0  # where the current segment of the batch starts
        while True:
            end_kept, end_record = len(lengths), len(reasons)
            boundary = False
            if self.shard_tokens:
                room = self.shard_tokens - self._counts.tokens
                hit = int(np.searchsorted(ends[kept:] - (ends[kept - 1] if kept else 0), room))
                if kept + hit < len(lengths):
                    end_kept, boundary = kept + hit + 1, True
                    end_record = int(kept_records[kept + hit]) + 1
            # In token mode a shard is opened only for records (no empty last shard);
            # in file mode every file has its shard, even an empty one.
            if end_record > record or self._writer is not None or not self.shard_tokens:
                self._write(tokens, ends, lengths, hashes, text_bytes, kept, end_kept)
                self._count(
                    reasons[record:end_record], lengths[kept:end_kept], text_bytes[kept:end_kept]
                )
                self._files_in_shard.add(result.file_index)
            if not boundary:
                break
            self._finish_shard([result.file_index, result.first_record + end_record])
            record, kept = end_record, end_kept
        if result.end_of_file and not self.shard_tokens:
            self._finish_shard([result.file_index + 1, 0])

    def _duplicates(self, result: Result, passed: np.ndarray) -> np.ndarray:
        """A drop reason per passed record: 0 to keep it."""
        if isinstance(self.dedup, DuplicateMarks):
            marks = self.dedup.drop_reasons(
                result.file_index, result.first_record, len(result.reasons)
            )
            return marks[passed]
        if self.dedup is None:
            return np.zeros(len(passed), dtype=np.int64)
        return np.where(self.dedup.add_new(result.hashes), 0, int(Reason.DUPLICATE))

    def finish(self) -> None:
        """End of the input: close the last shard (token mode)."""
        if self._writer is not None:
            self._finish_shard([len(self.files), 0])

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._hashes_file.close()
            self._writer = None

    def _open_shard(self) -> None:
        self._writer = IndexedDatasetWriter(self.state.shard_prefix(self.shard), self.dtype)
        self._hashes_file = open(_partial(self.state.hashes_path(self.shard)), "wb")
        self._counts = Counts()
        self._files_in_shard = set()

    def _write(self, tokens, ends, lengths, hashes, text_bytes, first: int, last: int) -> None:
        if self._writer is None:
            self._open_shard()
        if last > first:
            start = int(ends[first - 1]) if first else 0
            self._writer.add_documents(tokens[start : int(ends[last - 1])], lengths[first:last])
            self._hashes_file.write(np.asarray(hashes[first:last], dtype=HASH_DTYPE).tobytes())

    def _count(self, reasons: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray) -> None:
        counts = Counts(
            documents_in=len(reasons),
            documents_out=len(lengths),
            tokens=int(lengths.sum()),
            text_bytes=int(text_bytes.sum()),
            drops=Counter(count_reasons(reasons)),
        )
        self._counts.add(counts)
        self.run_counts.add(counts)

    def _finish_shard(self, next_position: list[int]) -> None:
        self._writer.finalize()
        self._hashes_file.flush()
        os.fsync(self._hashes_file.fileno())
        self._hashes_file.close()
        os.replace(_partial(self.state.hashes_path(self.shard)), self.state.hashes_path(self.shard))
        marker = {
            "shard": self.shard,
            "prefix": self.state.shard_prefix(self.shard),
            "next_position": next_position,
            "input_files": [str(self.files[i]) for i in sorted(self._files_in_shard)],
            **self._counts.to_dict(),
        }
        self.state.mark_done(self.shard, marker)
        log.info(
            "shard %d done: %s documents, %s tokens -> %s.bin/.idx",
            self.shard,
            f"{self._counts.documents_out:,}",
            f"{self._counts.tokens:,}",
            marker["prefix"],
        )
        self.shard += 1
        self._writer = None
        self._counts = Counts()

    def _report_bad_records(self, result: Result, reasons: np.ndarray) -> None:
        bad = np.flatnonzero(reasons != Reason.OK)
        if not len(bad):
            return
        details = {record: detail for record, _, detail in result.examples}
        if self.strict:
            record = int(bad[0])
            raise BadRecordError(
                f"{self._where(result, record)}: {Reason(reasons[record]).label}"
                f"{': ' + details[record] if record in details else ''} (--strict stops at the "
                "first bad record; without it, bad records are skipped and counted)"
            )
        for record in bad:
            reason = Reason(reasons[record])
            self._shown[reason] += 1
            if self._shown[reason] <= EXAMPLES_PER_REASON:
                suffix = (
                    " (further ones are only counted)"
                    if self._shown[reason] == EXAMPLES_PER_REASON
                    else ""
                )
                log.warning(
                    "skipped %s: %s%s%s",
                    self._where(result, int(record)),
                    reason.label,
                    f" ({details[record]})" if record in details else "",
                    suffix,
                )

    def _where(self, result: Result, record: int) -> str:
        path = self.files[result.file_index]
        number = result.first_record + record + 1
        if path.suffix == ".parquet":
            return f"{path}: row {number}"
        if ".txt" in path.suffixes and number == 1:
            return str(path)
        return f"{path}:{number}"


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")
