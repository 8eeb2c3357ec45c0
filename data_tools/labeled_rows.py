"""The rows of labeled data (--format sft|classify), each with where it came from, and
the counting of bad ones.

Rows are JSON objects, one a line of .jsonl files (also .gz and .zst), or rows of
.parquet files with all their columns. A bad row is counted under its reason and the
first few of each reason are logged with file:line; with --strict the first one stops
the run, naming file, line and reason.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from data_tools.reasons import Reason
from data_tools.shards import BadRecordError
from data_tools.sources import Batch, read_file_batches

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5
PARQUET_ROWS = 512


@dataclass
class Row:
    """One input row: its object, or the reason it has none."""

    file_index: int
    where: str  # path:line (path: row N in a parquet file)
    data: dict[str, Any] | None
    reason: Reason = Reason.OK
    detail: str = ""


class RowDrop(Exception):
    """A row that cannot become an example: why, as a drop reason, and the detail."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.label}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class RowBatch:
    rows: list[Row]
    done_bytes: int  # input bytes read so far, over all files


def read_rows(
    files: list[Path], batch_bytes: int = 1 << 20, max_record_bytes: int = 16 << 20
) -> Iterator[RowBatch]:
    """The rows of `files`, in order, in batches."""
    before = 0  # bytes of the files already read
    for index, path in enumerate(files):
        if path.suffix == ".parquet":
            batches = _parquet_rows(path, index)
        else:
            batches = _jsonl_rows(path, index, batch_bytes, max_record_bytes)
        for rows, file_bytes in batches:
            yield RowBatch(rows, before + file_bytes)
        before += os.path.getsize(path)


def _jsonl_rows(path: Path, index: int, batch_bytes: int, max_record_bytes: int):
    batches = read_file_batches(
        path, index, batch_bytes=batch_bytes, max_record_bytes=max_record_bytes
    )
    for batch in batches:
        yield _batch_rows(path, batch), batch.input_bytes


def _batch_rows(path: Path, batch: Batch) -> list[Row]:
    if batch.kind == "error":
        where = f"{path}:{batch.first_record + 1}"
        return [Row(batch.file_index, where, None, Reason.CORRUPT_FILE, batch.payload)]
    oversized = set(batch.oversized)
    rows = []
    for record, line in enumerate(batch.payload.split(b"\n")[:-1]):
        where = f"{path}:{batch.first_record + record + 1}"
        if record in oversized:
            detail = "a line larger than --max-record-mb, skipped unread"
            rows.append(Row(batch.file_index, where, None, Reason.TOO_LONG, detail))
            continue
        data, reason, detail = parse_json_row(line)
        rows.append(Row(batch.file_index, where, data, reason, detail))
    return rows


def parse_json_row(line: bytes) -> tuple[dict | None, Reason, str]:
    """(object, Reason.OK, "") for a line holding a JSON object, else (None, why, detail)."""
    if not line.strip():
        return None, Reason.EMPTY_LINE, "blank line"
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as decode_error:
            return None, Reason.INVALID_UTF8, str(decode_error)
        if "surrogate" in str(error):  # valid JSON syntax, but not valid Unicode
            return None, Reason.INVALID_UTF8, str(error)
        return None, Reason.INVALID_JSON, str(error)
    if not isinstance(data, dict):
        return None, Reason.INVALID_JSON, f"a JSON {type(data).__name__}, not an object"
    return data, Reason.OK, ""


def _parquet_rows(path: Path, index: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = os.path.getsize(path)
    number = 0
    try:
        parquet = pq.ParquetFile(path)
        total = max(1, parquet.metadata.num_rows)
        for table in parquet.iter_batches(batch_size=PARQUET_ROWS):
            rows = []
            for data in table.to_pylist():
                number += 1
                rows.append(Row(index, f"{path}: row {number}", data))
            yield rows, size * number // total
    except (OSError, pa.ArrowException) as error:
        where = f"{path}: row {number + 1}"
        yield [Row(index, where, None, Reason.CORRUPT_FILE, str(error))], size


class BadRows:
    """Counts bad rows by reason, logs the first few of each, or stops (strict)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: Counter[str] = Counter()

    def drop(self, where: str, reason: Reason, detail: str) -> None:
        if self.strict:
            raise BadRecordError(
                f"{where}: {reason.label}{': ' + detail if detail else ''} (--strict stops at "
                "the first bad row; without it, bad rows are skipped and counted)"
            )
        self.counts[reason.label] += 1
        shown = self.counts[reason.label]
        if shown <= EXAMPLES_PER_REASON:
            log.warning(
                "skipped %s: %s%s%s",
                where,
                reason.label,
                f" ({detail})" if detail else "",
                " (further ones are only counted)" if shown == EXAMPLES_PER_REASON else "",
            )

    def to_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
