"""Finding input files and reading them as batches of raw records, streaming.

Records are lines of jsonl files, rows of parquet files, and whole .txt files (or
their lines with txt_unit="line"). A batch holds complete records of one file and
about `batch_bytes` of input; a record larger than `max_record_bytes` is never held
in memory: it is skipped while reading and reported as too long. Compressed files
are decompressed as a stream; a truncated or corrupt one yields what could be read
and then an error batch, so the run goes on.
"""

from __future__ import annotations

import glob
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megagpt.errors import MegagptError

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst")
SUPPORTED = ".jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt (also .txt.gz, .txt.zst)"
PARQUET_ROWS = 512


class InputError(MegagptError):
    """An input path that does not exist or has a format we cannot read."""


@dataclass
class Batch:
    """Raw records of one file, on their way to a tokenizer worker.

    kind: "jsonl" (payload: bytes of complete lines), "lines" (same, each line a
    document), "docs" (list of bytes, one per document), "arrow" (a pyarrow array
    of the text column, or None if the file lacks it), "error" (payload: message).
    """

    seq: int
    file_index: int
    first_record: int
    kind: str
    payload: Any
    num_records: int
    input_bytes: int = 0  # bytes of the file (as stored) consumed by this batch
    end_of_file: bool = False
    oversized: tuple[int, ...] = field(default_factory=tuple)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Paths, directories (searched recursively) and globs, in the order given."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format(p))
        elif any(ch in pattern for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        elif path.is_file():
            found = [path]
        else:
            raise InputError(f"input {pattern!r}: no such file or directory")
        if not found:
            raise InputError(
                f"input {pattern!r} matches no file of a supported format ({SUPPORTED})"
            )
        for p in found:
            if not _format(p):
                raise InputError(f"input {p}: unsupported format; supported: {SUPPORTED}")
        files.extend(found)
    if len(set(files)) != len(files):
        raise InputError("the same input file is named twice; each file is read once")
    return files


def _format(path: Path) -> str | None:
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _open_stream(path: Path, raw):
    if path.suffix == ".gz":
        return _Decompressing(raw, lambda: zlib.decompressobj(wbits=47))  # gzip or zlib header
    if path.suffix == ".zst":
        import zstandard

        return _Decompressing(raw, lambda: zstandard.ZstdDecompressor().decompressobj())
    return raw


class _Decompressing:
    """A decompressing reader that, unlike gzip.GzipFile or zstandard's stream reader,
    returns everything before the damage of a truncated or corrupt file (and then
    raises): the first silently drops the last block, the second silently stops
    at a truncation. Handles concatenated members/frames."""

    STEP = 1 << 16

    def __init__(self, raw, new_decompressor):
        self.raw, self.new_decompressor = raw, new_decompressor
        self.decompressor = new_decompressor()
        self.fed = False  # the current member has received input
        self.buffer = b""
        self.error: BaseException | None = None
        self.done = False

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size and not self.done:
            chunk = self.raw.read(self.STEP)
            try:
                if not chunk:
                    self.done = True
                    if self.fed and not self.decompressor.eof:
                        raise EOFError("compressed file ended before the end-of-stream marker")
                    break
                self._feed(chunk)
            except _decompression_errors() as error:
                self.error, self.done = error, True
        if not self.buffer and self.error is not None:
            raise self.error
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def _feed(self, chunk: bytes) -> None:
        while chunk:
            self.fed = True
            self.buffer += self.decompressor.decompress(chunk)
            if not self.decompressor.eof:
                return
            chunk = self.decompressor.unused_data  # the next member or frame, if any
            self.decompressor, self.fed = self.new_decompressor(), False


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def read_file_batches(
    path: Path,
    file_index: int,
    skip_records: int = 0,
    batch_bytes: int = 1 << 20,
    max_record_bytes: int = 4 << 20,
    txt_unit: str = "file",
    text_field: str = "text",
) -> Iterator[Batch]:
    """Batches of `path`'s records after the first `skip_records` (seq left at 0).

    The last batch has end_of_file set (an empty one if the file has no records).
    """
    kind = _format(path)
    if kind == "parquet":
        yield from _parquet_batches(path, file_index, skip_records, text_field)
        return
    line_kind = "jsonl" if kind == "jsonl" else "lines" if txt_unit == "line" else None
    try:
        raw = open(path, "rb")
    except OSError as error:  # unreadable (permissions, vanished): counted, not fatal
        yield Batch(0, file_index, skip_records, "error", f"{path}: {error}", 1, 0, True)
        return
    with raw:
        stream = _open_stream(path, raw)
        record = 0
        try:
            if line_kind is None:
                data = stream.read(max_record_bytes + 1)
                too_big = len(data) > max_record_bytes
                payload, oversized = ([b""], (0,)) if too_big else ([data], ())
                size = os.path.getsize(path)
                if skip_records:  # already done in an earlier run
                    yield Batch(0, file_index, 1, "docs", [], 0, size, True)
                else:
                    yield Batch(0, file_index, 0, "docs", payload, 1, size, True, oversized)
                return
            for block, count, oversized in _line_blocks(stream, batch_bytes, max_record_bytes):
                if record + count <= skip_records:
                    record += count
                    continue
                if record < skip_records:  # resume in the middle of this block
                    cut = _nth_newline(block, skip_records - record)
                    block = block[cut + 1 :]
                    oversized = tuple(
                        o - (skip_records - record) for o in oversized if o >= skip_records - record
                    )
                    count -= skip_records - record
                    record = skip_records
                yield Batch(
                    0, file_index, record, line_kind, block, count, raw.tell(), False, oversized
                )
                record += count
        except _decompression_errors() as error:
            message = f"{path}: {type(error).__name__}: {error} (after {record:,} records)"
            yield Batch(
                0, file_index, max(record, skip_records), "error", message, 1, raw.tell(), True
            )
            return
        yield Batch(0, file_index, max(record, skip_records), line_kind, b"", 0, raw.tell(), True)


def _line_blocks(stream, batch_bytes: int, max_record_bytes: int):
    """(bytes of complete lines, line count, offsets of elided over-long lines)."""
    carry = b""
    skipping = False  # inside a line longer than max_record_bytes
    while True:
        block = stream.read(batch_bytes)
        if not block:
            if carry or skipping:
                yield (b"\n", 1, (0,)) if skipping else (carry + b"\n", 1, ())
            return
        if skipping:
            end = block.find(b"\n")
            if end < 0:
                continue
            skipping = False
            block = block[end + 1 :]
            yield b"\n", 1, (0,)  # an empty placeholder keeps the line numbers right
        last = block.rfind(b"\n")
        if last < 0:
            carry += block
            if len(carry) > max_record_bytes:
                carry, skipping = b"", True
            continue
        lines = carry + block[: last + 1]
        carry = block[last + 1 :]
        count = lines.count(b"\n")
        if count == 1 and len(lines) > max_record_bytes + 1:
            yield b"\n", 1, (0,)
            continue
        yield lines, count, ()
        if len(carry) > max_record_bytes:
            carry, skipping = b"", True


def _nth_newline(block: bytes, n: int) -> int:
    position = -1
    for _ in range(n):
        position = block.index(b"\n", position + 1)
    return position


def _parquet_batches(path: Path, file_index: int, skip_records: int, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        yield Batch(0, file_index, 0, "error", f"{path}: {error}", 1, os.path.getsize(path), True)
        return
    rows = parquet.metadata.num_rows
    size = os.path.getsize(path)
    if text_field not in parquet.schema_arrow.names:
        for start in range(skip_records, rows, PARQUET_ROWS):  # every row lacks the field
            count = min(PARQUET_ROWS, rows - start)
            yield Batch(0, file_index, start, "arrow", None, count, size * (start + count) // rows)
        yield Batch(0, file_index, rows, "arrow", None, 0, size, True)
        return
    record = 0
    try:
        for table in parquet.iter_batches(batch_size=PARQUET_ROWS, columns=[text_field]):
            column = table.column(0)
            if record + len(column) > skip_records:
                column = column.slice(max(0, skip_records - record))
                first = max(record, skip_records)
                done = size * (record + len(table)) // max(1, rows)
                yield Batch(0, file_index, first, "arrow", column, len(column), done)
            record += len(table)
    except (OSError, pa.ArrowException) as error:
        yield Batch(
            0, file_index, max(record, skip_records), "error", f"{path}: {error}", 1, size, True
        )
        return
    yield Batch(0, file_index, max(record, skip_records), "arrow", None, 0, size, True)


def check_tokenizer_and_shards(args) -> None:
    """The options every preprocessing format shares: --shard-tokens and --tokenizer."""
    if args.shard_tokens is not None and args.shard_tokens < 1:
        raise InputError(f"--shard-tokens = {args.shard_tokens}: give a positive token count")
    if not Path(args.tokenizer).is_file():
        raise InputError(
            f"--tokenizer {args.tokenizer}: no such file (give a sentencepiece .model or a "
            "tokenizer.json, or train one with megagpt-train-tokenizer)"
        )
