"""megagpt-preprocess's processes: one reader, N tokenizer workers, the writer.

    reader ──tasks──▶ worker × N ──results──▶ writer (this process)

The reader may be at most `max_in_flight` batches ahead of the writer (a semaphore
the writer releases as it consumes each batch), so memory is bounded by
max_in_flight × batch size whatever the corpus size and however the workers are
scheduled; the writer puts results back in input order before consuming them.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_tools.cleaning import CleaningOptions
from data_tools.dedup import HASH_DTYPE, DedupIndex
from data_tools.minhash import MinHashSettings
from data_tools.progress import Progress
from data_tools.shards import ShardedOutput
from data_tools.sources import InputError, read_file_batches
from data_tools.state import RunState, atomic_write_json
from data_tools.stats import Counts
from data_tools.worker import WorkerSettings, worker_main
from megagpt.data.indexed import token_dtype
from megagpt.tokenizer import Tokenizer
from megagpt.utils.files import file_sha256
from megagpt.utils.run_lock import RunLock

log = logging.getLogger(__name__)


@dataclass
class PreprocessOptions:
    """Everything megagpt-preprocess does; see its --help for each setting."""

    inputs: list[Path]
    output_prefix: str
    tokenizer: str
    text_field: str = "text"
    workers: int = max(1, os.cpu_count() or 1)
    shard_tokens: int | None = None
    batch_bytes: int = 1 << 20
    max_record_bytes: int = 16 << 20
    txt_unit: str = "file"
    cleaning: CleaningOptions = CleaningOptions()
    dedup: bool = True
    strict: bool = False
    overwrite: bool = False
    log_interval: float = 30.0
    progress_bar: bool | None = None  # None: when stderr is a terminal
    near_dedup: MinHashSettings | None = None
    num_tasks: int = 1
    task_index: int = 0
    phase: str = "all"  # or one of scan, dedup, tokenize (data_tools/tasks.py)
    dedup_partitions: int | None = None  # None: one per 512 MB of input

    def fingerprint(self) -> dict:
        """What decides the output; a restart must match it to resume."""
        near = {"near_dedup": asdict(self.near_dedup)} if self.near_dedup else {}
        cleaning = asdict(self.cleaning)
        if not self.cleaning.filters.enabled:  # as recorded before filters existed
            cleaning.pop("filters")
        return {
            **near,
            "inputs": [
                [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.inputs
            ],
            "tokenizer_sha256": file_sha256(Path(self.tokenizer)),
            "text_field": self.text_field,
            "shard_tokens": self.shard_tokens,
            "max_record_bytes": self.max_record_bytes,
            "txt_unit": self.txt_unit,
            "cleaning": cleaning,
            "dedup": self.dedup,
        }


def reader_main(
    options: PreprocessOptions, start: list[int], tasks, results, credits, parent_pid: int
) -> None:
    """Send every batch after `start` = [file, record], then the batch count."""
    seq = 0
    try:
        first_file, skip = start
        for index in range(first_file, len(options.inputs)):
            batches = read_file_batches(
                options.inputs[index],
                index,
                skip_records=skip if index == first_file else 0,
                batch_bytes=options.batch_bytes,
                max_record_bytes=options.max_record_bytes,
                txt_unit=options.txt_unit,
                text_field=options.text_field,
            )
            for batch in batches:
                while not credits.acquire(timeout=1.0):
                    if os.getppid() != parent_pid:
                        return
                batch.seq = seq
                tasks.put(batch)
                seq += 1
        results.put(("end", seq))
    except Exception as error:
        log.exception("reader failed")
        results.put(("reader-error", repr(error)))
    finally:
        for _ in range(options.workers):
            tasks.put(None)


def run_preprocess(options: PreprocessOptions, marks=None) -> dict:
    """Run (or resume) a preprocessing job; return the summary written next to the output.

    `marks` (a global_dedup.DuplicateMarks) replaces the streaming exact-dedup index
    with the verdicts of a job's dedup phase."""
    with output_lock(options.output_prefix):
        return _run_preprocess(options, marks)


def output_lock(prefix: str) -> RunLock:
    """The lock that keeps a second job from writing into the same prefix."""
    directory = Path(prefix).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"--output-prefix {prefix}: cannot create {directory} ({error.strerror})"
        ) from None
    return RunLock(f"{prefix}.lock", "megagpt-preprocess", "choose another --output-prefix")


def _run_preprocess(options: PreprocessOptions, marks) -> dict:
    started = time.perf_counter()
    state = RunState(options.output_prefix)
    state.open(options.fingerprint(), options.overwrite)
    vocab_size = Tokenizer(options.tokenizer).vocab_size
    dtype = token_dtype(vocab_size)
    markers = state.completed()
    start = markers[-1]["next_position"] if markers else [0, 0]
    previous = Counts()
    for marker in markers:
        previous.add(Counts.from_dict(marker))
    if markers:
        log.info(
            "resuming after %d finished shard(s), at input file %d record %d", len(markers), *start
        )
    dedup = marks
    if marks is None and options.dedup:
        dedup = DedupIndex(state.directory / "dedup")
        for path in state.completed_hashes(markers):
            _load_hashes(dedup, path)
    output = ShardedOutput(
        state, options.inputs, dtype, options.shard_tokens, dedup, options.strict, len(markers)
    )
    sizes = [p.stat().st_size for p in options.inputs]
    progress = Progress(
        sum(sizes), sum(sizes[: start[0]]), options.log_interval, options.progress_bar
    )
    try:
        if start[0] < len(options.inputs):
            settings = WorkerSettings(
                options.tokenizer, options.text_field, dtype.str, options.cleaning
            )
            run_workers(options, start, settings, output, progress, sizes)
        output.finish()
    except BaseException:
        output.abort()
        raise
    finally:
        progress.close()
        if isinstance(dedup, DedupIndex):
            dedup.close()
    return _write_outputs(
        state,
        options,
        vocab_size,
        dtype,
        previous,
        output.run_counts,
        len(markers),
        time.perf_counter() - started,
    )


def run_workers(
    options: PreprocessOptions,
    start: list[int],
    settings: WorkerSettings,
    output,
    progress: Progress,
    sizes: list[int],
) -> None:
    """Read options.inputs from `start` = [file, record], process every batch in
    `options.workers` worker processes and hand the results, in input order, to
    `output.consume`."""
    context = mp.get_context("spawn")  # workers start clean: no copy of this process's memory
    max_in_flight = 2 * options.workers + 2
    tasks, results = context.Queue(), context.Queue()
    credits = context.Semaphore(max_in_flight)
    workers = [
        context.Process(
            target=worker_main, args=(settings, tasks, results, os.getpid()), daemon=True
        )
        for _ in range(options.workers)
    ]
    reader = context.Process(
        target=reader_main, args=(options, start, tasks, results, credits, os.getpid()), daemon=True
    )
    processes = [reader, *workers]
    file_starts = [0, *itertools.accumulate(sizes)]  # bytes of the inputs before each file
    for process in processes:
        process.start()
    try:
        pending, next_seq, total = {}, 0, None
        while total is None or next_seq < total:
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                _check_alive(processes)
                continue
            if isinstance(message, tuple):
                if message[0] == "reader-error":
                    raise RuntimeError(f"the input reader failed: {message[1]}")
                total = message[1]
                continue
            pending[message.seq] = message
            while next_seq in pending:
                result = pending.pop(next_seq)
                output.consume(result)
                credits.release()
                next_seq += 1
                progress.update(
                    file_starts[result.file_index] + result.input_bytes, len(result.reasons)
                )
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)


def _check_alive(processes) -> None:
    for process in processes:
        if process.exitcode not in (None, 0):
            raise RuntimeError(
                f"a preprocessing process ({process.name}) died with exit code {process.exitcode}"
                " (a negative code is the signal: -9 is often the out-of-memory killer); rerun "
                "the same command to resume from the last finished shard"
            )


def _load_hashes(dedup: DedupIndex, path: Path, chunk: int = 1 << 20) -> None:
    count = path.stat().st_size // HASH_DTYPE.itemsize
    for start in range(0, count, chunk):
        dedup.add_new(
            np.fromfile(path, dtype=HASH_DTYPE, count=chunk, offset=start * HASH_DTYPE.itemsize)
        )


def _write_outputs(
    state,
    options,
    vocab_size,
    dtype,
    previous: Counts,
    this_run: Counts,
    resumed_after: int,
    elapsed: float,
) -> dict:
    markers = state.completed()
    shards = [  # named relative to the manifest's directory (megagpt/data/manifest.py)
        {
            "prefix": Path(m["prefix"]).name,
            "documents": m["documents_out"],
            "tokens": m["tokens"],
            "input_files": m["input_files"],
        }
        for m in markers
    ]
    manifest = {
        "tokenizer": str(Path(options.tokenizer).resolve()),
        "tokenizer_sha256": file_sha256(options.tokenizer),
        "vocab_size": vocab_size,
        "dtype": str(dtype),
        "eod_appended": True,
        "shards": shards,
        "data_path": [Path(m["prefix"]).name for m in markers],
    }
    atomic_write_json(state.manifest_path, manifest)
    total = Counts()
    total.add(previous)
    total.add(this_run)
    input_bytes = sum(p.stat().st_size for p in options.inputs)
    summary = {
        **total.to_dict(),
        "input_files": len(options.inputs),
        "input_bytes": input_bytes,
        "shards": len(markers),
        "resumed_after_shards": resumed_after,
        "this_run": {
            **this_run.to_dict(),
            "seconds": round(elapsed, 3),
            "documents_per_s": round(this_run.documents_in / elapsed, 1),
            "tokens_per_s": round(this_run.tokens / elapsed, 1),
            "text_mb_per_s": round(this_run.text_bytes / elapsed / 1e6, 3),
        },
        "manifest": str(state.manifest_path),
    }
    atomic_write_json(state.summary_path, summary)
    return summary
