"""Running a preprocessing job in phases over tasks: scan, dedup, tokenize (tasks.py).

One process with --near-dedup runs the three phases in turn; a SLURM array runs
each phase as its own job (`megagpt launch preprocess --array N`), every task with
the same arguments plus --phase. Each phase of each task resumes where a killed
run stopped, and the job's settings are recorded once (P.job/config.json) so that
no task can join a job started with other inputs or settings.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from data_tools.global_dedup import DuplicateMarks, default_partitions, run_dedup
from data_tools.pipeline import PreprocessOptions, run_preprocess, run_workers
from data_tools.progress import Progress
from data_tools.scan import ScanOutput, finish_scan, prepare_scan_directory
from data_tools.sources import InputError
from data_tools.state import RunState, StateError, atomic_write_json, read_json
from data_tools.tasks import PHASES, JobLayout, split_files
from data_tools.worker import WorkerSettings
from megagpt.utils.run_lock import RunLock

log = logging.getLogger(__name__)


MULTI_TASK_PHASES = (
    "--num-tasks {tasks}: give --phase (scan, dedup, then tokenize: each phase needs the "
    "previous one finished by every task); `megagpt launch preprocess --array N` submits "
    "them as dependent SLURM jobs"
)


def is_phased(options: PreprocessOptions) -> bool:
    """Whether the job needs phases (one process with exact dedup only streams)."""
    return options.near_dedup is not None or options.num_tasks > 1 or options.phase != "all"


def dedup_kinds(options: PreprocessOptions) -> tuple[str, ...]:
    return (("exact",) if options.dedup else ()) + (("near",) if options.near_dedup else ())


def run_job(options: PreprocessOptions) -> dict:
    """Run the phases this command asks for; returns what the last one reports, with
    "phase" naming it."""
    if options.phase == "all" and options.num_tasks > 1:
        raise InputError(MULTI_TASK_PHASES.format(tasks=options.num_tasks))
    layout = JobLayout(options.output_prefix, options.num_tasks)
    sizes = [p.stat().st_size for p in options.inputs]
    files = split_files(sizes, options.num_tasks)[options.task_index]
    kinds = dedup_kinds(options)
    partitions = options.dedup_partitions or default_partitions(sum(sizes))
    _open_job(layout, options, partitions)
    report: dict = {}
    for phase in PHASES if options.phase == "all" else (options.phase,):
        if phase != "tokenize" and not kinds:
            log.info(
                "no deduplication asked for (--no-dedup): the %s phase has nothing to do", phase
            )
            report = {"phase": phase, "skipped": True}
        elif phase == "scan":
            report = _scan(options, layout, files, kinds, partitions)
        elif phase == "dedup":
            with RunLock(layout.directory / "dedup.lock", "dedup phase", "wait for it to finish"):
                report = {"phase": "dedup", **run_dedup(
                    layout, kinds, partitions, options.workers, options.log_interval
                )}  # fmt: skip
        else:
            report = _tokenize(options, layout, files, kinds)
    return report


def _open_job(layout: JobLayout, options: PreprocessOptions, partitions: int) -> None:
    """Record the job's settings, or check that this task's match the recorded ones."""
    config = {
        **options.fingerprint(),
        "num_tasks": options.num_tasks,
        "partitions": partitions,
    }
    if options.overwrite:
        if options.num_tasks > 1:
            raise InputError(
                "--overwrite with --num-tasks > 1 would let one task delete the others' work; "
                f"delete {layout.directory} and the outputs of {layout.prefix} yourself, or "
                "choose another --output-prefix"
            )
        shutil.rmtree(layout.directory, ignore_errors=True)
        RunState(layout.prefix).discard()
    if layout.config_path.exists():
        previous = read_json(layout.config_path)
        if previous != config:
            changed = sorted(
                k for k in config.keys() | previous if config.get(k) != previous.get(k)
            )
            raise StateError(
                f"{layout.directory} holds a job started with different {', '.join(changed)}; "
                "run every task and phase with the same arguments (or pass --overwrite to a "
                "one-task job, or choose another --output-prefix)"
            )
        return
    layout.directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.config_path, config)  # tasks racing here write the same bytes


def _task_options(options: PreprocessOptions, files: range, **changes) -> PreprocessOptions:
    return dataclasses.replace(
        options, inputs=[options.inputs[i] for i in files], overwrite=False, **changes
    )


def _scan(options, layout: JobLayout, files: range, kinds, partitions: int) -> dict:
    task = options.task_index
    started = time.perf_counter()
    prepare_scan_directory(layout, task, kinds, partitions)
    with RunLock(
        layout.scan_directory(task) / "lock", f"scan of task {task}", "wait for it to finish"
    ):
        output = ScanOutput(layout, task, files, partitions, kinds)
        first = output.resume_position()
        if first < len(files):
            task_options = _task_options(options, files)
            sizes = [p.stat().st_size for p in task_options.inputs]
            settings = WorkerSettings(
                options.tokenizer,
                options.text_field,
                "<u2",
                options.cleaning,
                mode="scan",
                minhash=options.near_dedup,
            )
            progress = Progress(
                sum(sizes), sum(sizes[:first]), options.log_interval, options.progress_bar, "scan"
            )
            try:
                run_workers(task_options, [first, 0], settings, output, progress, sizes)
            finally:
                progress.close()
        report = finish_scan(layout, task, files, started)
    log.info(
        "scan of task %d: %s documents, %s keys from %d file(s)",
        task,
        f"{report['documents']:,}",
        f"{output.keys:,}",
        len(files),
    )
    return {"phase": "scan", **report, "keys": output.keys}


def _tokenize(options, layout: JobLayout, files: range, kinds) -> dict:
    if kinds and not layout.dedup_done.exists():
        raise InputError(
            f"the dedup phase of {layout.prefix} has not finished ({layout.dedup_done} is "
            "missing): run `--phase dedup` first"
        )
    marks = DuplicateMarks(layout, kinds, files.start) if kinds else None
    task_options = _task_options(
        options,
        files,
        output_prefix=layout.task_prefix(options.task_index),
        near_dedup=None,
        num_tasks=1,
        task_index=0,
        phase="all",
    )
    summary = run_preprocess(task_options, marks=marks)
    job = finish_job(layout, options)
    return {"phase": "tokenize", **summary, "job": job}


def finish_job(layout: JobLayout, options: PreprocessOptions) -> dict | None:
    """Once every task has tokenized, write the job's manifest and summary (done by the
    last task to finish, under a lock; None while tasks are still running). Tasks that
    finish together take turns, and each may write the job's manifest, the same one."""
    lock = RunLock(layout.directory / "finish.lock", "job completion", "run it again", wait_s=120)
    with lock:
        states = [RunState(layout.task_prefix(t)) for t in range(layout.num_tasks)]
        if not all(state.manifest_path.exists() for state in states):
            return None
        manifests = [read_json(state.manifest_path) for state in states]
        summaries = [read_json(state.summary_path) for state in states]
        dedup = read_json(layout.dedup_done) if layout.dedup_done.exists() else None
        final = RunState(layout.prefix)
        manifest = {
            **{key: manifests[0][key] for key in ("tokenizer", "tokenizer_sha256", "vocab_size")},
            **{key: manifests[0][key] for key in ("dtype", "eod_appended")},
            "shards": [shard for m in manifests for shard in m["shards"]],
            "data_path": [prefix for m in manifests for prefix in m["data_path"]],
            "tasks": layout.num_tasks,
        }
        summary = _job_summary(summaries, options, dedup, final.manifest_path)
        if layout.num_tasks > 1:
            atomic_write_json(final.manifest_path, manifest)
        else:  # the one task wrote P's manifest itself; add what the job found
            summary = {**summaries[0], "deduplication": summary["deduplication"]}
        atomic_write_json(final.summary_path, summary)
        return summary


def _job_summary(summaries: list[dict], options, dedup: dict | None, manifest: Path) -> dict:
    totals: dict = {"documents_in": 0, "documents_out": 0, "tokens": 0, "text_bytes": 0}
    drops: dict[str, int] = {}
    for summary in summaries:
        for key in totals:
            totals[key] += summary[key]
        for reason, count in summary["drops"].items():
            drops[reason] = drops.get(reason, 0) + count
    return {
        **totals,
        "drops": dict(sorted(drops.items())),
        "input_files": sum(s["input_files"] for s in summaries),
        "input_bytes": sum(s["input_bytes"] for s in summaries),
        "shards": sum(s["shards"] for s in summaries),
        "tasks": [
            {"manifest": s["manifest"], "documents_out": s["documents_out"], "tokens": s["tokens"]}
            for s in summaries
        ],
        "deduplication": {
            "exact": options.dedup,
            "near": dataclasses.asdict(options.near_dedup) if options.near_dedup else None,
            "near_description": options.near_dedup.describe() if options.near_dedup else None,
            **(dedup or {}),
        },
        "manifest": str(manifest),
    }
