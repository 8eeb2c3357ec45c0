"""Tokenizer workers: raw records in, cleaned, hashed and tokenized documents out.

A worker turns one `Batch` into one `Result`: a reason code per record, and for the
records that passed, a 128-bit content hash and their tokens (EOD appended) as one
numpy array. That array is the only copy of the tokens that crosses a process
boundary, pickled once as a single buffer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import orjson

from data_tools.cleaning import CleaningOptions, clean_and_explain
from data_tools.minhash import MinHasher, MinHashSettings
from data_tools.reasons import Reason
from data_tools.sources import Batch

log = logging.getLogger(__name__)

HASH_BYTES = 16
EXAMPLES_PER_BATCH = 5  # bad records described per reason and batch, for the log


@dataclass
class Result:
    """What the writer needs of one batch, in stream order by `seq`."""

    seq: int
    file_index: int
    first_record: int
    end_of_file: bool
    input_bytes: int
    reasons: np.ndarray  # int8 per record
    hashes: np.ndarray  # S16 per record that passed
    lengths: np.ndarray  # int64 tokens (with EOD) per record that passed
    tokens: np.ndarray  # the tokens of those records, back to back
    text_bytes: np.ndarray  # int64 UTF-8 bytes per record that passed
    examples: list[tuple[int, int, str]] = field(default_factory=list)  # (record, reason, detail)
    error: str | None = None  # an unexpected exception in the worker
    band_keys: np.ndarray | None = None  # scan with --near-dedup: (passed, bands) uint64


@dataclass(frozen=True)
class WorkerSettings:
    tokenizer_path: str
    text_field: str
    dtype: str
    cleaning: CleaningOptions
    mode: str = "tokenize"  # or "scan": hashes and MinHash keys, no tokens (job.py)
    minhash: MinHashSettings | None = None


class BatchProcessor:
    """Everything a worker does to a batch; also usable in-process."""

    def __init__(self, settings: WorkerSettings):
        # One worker per core, so the tokenizers library must not start a thread pool in
        # each: it reads these when it first would (a worker is a fresh spawned process).
        # Used in-process, this keeps the whole process's tokenizers to one thread.
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from megagpt.tokenizer import Tokenizer

        self.settings = settings
        self.tokenizer = Tokenizer(settings.tokenizer_path)
        self.eod = self.tokenizer.eod_id
        self.dtype = np.dtype(settings.dtype)
        self.field = settings.text_field
        self.minhasher = MinHasher(settings.minhash) if settings.minhash else None

    def process(self, batch: Batch) -> Result:
        reasons = np.zeros(batch.num_records, dtype=np.int8)
        texts: list[str] = []
        hashes: list[bytes] = []
        text_bytes: list[int] = []
        examples: list[tuple[int, int, str]] = []
        cleaned: list[bytes] = []  # for MinHash

        described: Counter = Counter()

        def drop(record: int, reason: Reason, detail: str) -> None:
            reasons[record] = reason
            described[reason] += 1
            if described[reason] <= EXAMPLES_PER_BATCH:
                examples.append((record, int(reason), detail))

        oversized = set(batch.oversized)
        for record, (raw, reason, detail) in enumerate(batch_records(batch, self.field)):
            if record in oversized:
                drop(record, Reason.TOO_LONG, "record larger than the reader's limit")
                continue
            if reason != Reason.OK:
                drop(record, reason, detail)
                continue
            text, data, reason, detail = clean_and_explain(raw, self.settings.cleaning)
            if reason != Reason.OK:
                drop(record, reason, detail)
                continue
            texts.append(text)
            hashes.append(hashlib.blake2b(data, digest_size=HASH_BYTES).digest())
            text_bytes.append(len(data))
            if self.minhasher is not None:
                cleaned.append(data)
        hash_array = np.frombuffer(b"".join(hashes), dtype=f"S{HASH_BYTES}")
        band_keys = None
        if self.settings.mode == "scan":
            tokens, lengths = np.zeros(0, self.dtype), np.zeros(0, np.int64)
            if self.minhasher is not None:
                band_keys = self.minhasher.band_keys(cleaned, hash_array)
        else:
            tokens, lengths = self._tokenize(texts)
        return Result(
            seq=batch.seq,
            file_index=batch.file_index,
            first_record=batch.first_record,
            end_of_file=batch.end_of_file,
            input_bytes=batch.input_bytes,
            reasons=reasons,
            hashes=hash_array,
            lengths=lengths,
            tokens=tokens,
            text_bytes=np.asarray(text_bytes, dtype=np.int64),
            examples=examples,
            band_keys=band_keys,
        )

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        ids = self.tokenizer.encode_batch(texts, num_threads=1)  # a worker per core
        for row in ids:
            row.append(self.eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths


def batch_records(batch: Batch, text_field: str):
    """(text or None, reason, detail) for each record of a batch, in order."""
    if batch.kind == "jsonl":
        yield from (_json_record(line, text_field) for line in batch.payload.split(b"\n")[:-1])
    elif batch.kind == "lines":
        yield from (_decode(line) for line in batch.payload.split(b"\n")[:-1])
    elif batch.kind == "docs":
        yield from (_decode(doc) for doc in batch.payload)
    elif batch.kind == "arrow":
        yield from _arrow_records(batch.payload, batch.num_records, text_field)
    elif batch.kind == "error":
        yield None, Reason.CORRUPT_FILE, batch.payload
    else:
        raise ValueError(f"unknown batch kind {batch.kind!r}")


def _json_record(line: bytes, text_field: str):
    if not line.strip():
        return None, Reason.EMPTY_LINE, "blank line"
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        if "surrogate" in str(error):  # valid JSON syntax, but not valid Unicode
            return None, Reason.INVALID_UTF8, str(error)
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as decode_error:
            return None, Reason.INVALID_UTF8, str(decode_error)
        return None, Reason.INVALID_JSON, str(error)
    if not isinstance(obj, dict):
        return None, Reason.INVALID_JSON, f"a JSON {type(obj).__name__}, not an object"
    value = obj.get(text_field)
    if value is None:
        return None, Reason.MISSING_FIELD, f"no {text_field!r} field (keys: {list(obj)[:5]})"
    if not isinstance(value, str):
        return None, Reason.WRONG_TYPE, f"{text_field!r} is a {type(value).__name__}"
    return value, Reason.OK, ""


def _decode(raw: bytes):
    try:
        return raw.decode("utf-8"), Reason.OK, ""
    except UnicodeDecodeError as error:
        return None, Reason.INVALID_UTF8, str(error)


def _arrow_records(column, count: int, text_field: str):
    import pyarrow as pa

    if column is None:
        yield from ((None, Reason.MISSING_FIELD, f"no {text_field!r} column") for _ in range(count))
        return
    kind = column.type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        yield from (
            (None, Reason.WRONG_TYPE, f"{text_field!r} column is {kind}") for _ in range(count)
        )
        return
    for value in column.to_pylist():
        if value is None:
            yield None, Reason.MISSING_FIELD, f"{text_field!r} is null"
        elif isinstance(value, bytes):
            yield _decode(value)
        else:
            yield value, Reason.OK, ""


def worker_main(settings: WorkerSettings, tasks, results, parent_pid: int) -> None:
    """Process batches from `tasks` until a None arrives (or the parent dies)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    processor = BatchProcessor(settings)
    while True:
        try:
            batch = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the main process was killed: stop too
                return
            continue
        if batch is None:
            return
        try:
            results.put(processor.process(batch))
        except Exception as error:  # a bug, not bad data: report it and stop the run
            log.exception("worker failed on batch %d", batch.seq)
            results.put(
                Result(
                    batch.seq,
                    batch.file_index,
                    batch.first_record,
                    batch.end_of_file,
                    batch.input_bytes,
                    *([np.zeros(0)] * 5),
                    error=repr(error),
                )
            )
            return
