"""A preprocessing job spread over tasks (a SLURM array, or one after another here).

Deduplication must see the whole corpus, tokenization need not, so a job with
deduplication runs in three phases over N tasks that share the output file system:

  scan      task i cleans and filters its files and writes, per kept document, its
            content hash and (with --near-dedup) its MinHash band keys, spread over
            hash partitions under P.job/scan/task_i/
  dedup     one task reads each partition of every task, groups equal keys and marks
            every document that is not the first of its group (the first in input
            order, as one process reading the files in turn would keep it) in
            P.job/marks/
  tokenize  task i tokenizes its files, leaving out the marked documents, into its
            own shards P_task0000i_00000.bin/.idx, ...; the task that finishes last
            writes P.manifest.json listing every task's shards in input order

Every task gets a contiguous run of the input files, balanced by bytes, so the
concatenated shards of all tasks equal, token for token, what one process writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data_tools.sources import InputError

PHASES = ("scan", "dedup", "tokenize")


def split_files(sizes: list[int], num_tasks: int) -> list[range]:
    """Contiguous ranges of file indices, one per task, of about equal bytes: task k
    takes the files whose first byte lies in the k-th N-th of the total (a task may get
    none when there are fewer large files than tasks)."""
    total = max(1, sum(sizes))
    bounds, start, seen = [], 0, 0
    for k in range(num_tasks):
        end = start
        while end < len(sizes) and (seen + sizes[end] / 2) * num_tasks < (k + 1) * total:
            seen += sizes[end]
            end += 1
        if k == num_tasks - 1:
            end = len(sizes)
        bounds.append(range(start, end))
        start = end
    return bounds


def task_index(given: int | None, num_tasks: int) -> int:
    """--task-index, else the SLURM array task id (counted from the array's first)."""
    if given is None and num_tasks > 1:
        array_id = os.environ.get("SLURM_ARRAY_TASK_ID")
        if array_id is None:
            raise InputError(
                f"--num-tasks {num_tasks}: give --task-index (0 to {num_tasks - 1}), or run "
                "as a SLURM array task (SLURM_ARRAY_TASK_ID); `megagpt launch preprocess "
                "--array N` submits the phases as array jobs"
            )
        given = int(array_id) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    index = given or 0
    if not 0 <= index < num_tasks:
        raise InputError(f"--task-index {index} is outside 0..{num_tasks - 1} (--num-tasks)")
    return index


@dataclass(frozen=True)
class JobLayout:
    """Where the phases of the job with output prefix P keep their files."""

    prefix: str
    num_tasks: int

    @property
    def directory(self) -> Path:
        return Path(self.prefix + ".job")

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    def scan_directory(self, task: int) -> Path:
        return self.directory / "scan" / f"task_{task:05d}"

    def scan_marker(self, task: int, file_index: int) -> Path:
        return self.scan_directory(task) / f"file_{file_index:06d}.done"

    def scan_done(self, task: int) -> Path:
        return self.scan_directory(task) / "done.json"

    def partition_path(self, task: int, kind: str, partition: int) -> Path:
        return self.scan_directory(task) / f"{kind}_{partition:05d}.keys"

    @property
    def dedup_directory(self) -> Path:
        return self.directory / "dedup"

    def partition_marker(self, kind: str, partition: int) -> Path:
        return self.dedup_directory / f"{kind}_{partition:05d}.done"

    @property
    def dedup_done(self) -> Path:
        return self.dedup_directory / "done.json"

    def marks_path(self, kind: str) -> Path:
        return self.dedup_directory / f"{kind}.marks"

    def task_prefix(self, task: int) -> str:
        """The output prefix of task `task`'s shards (P itself for a one-task job)."""
        return self.prefix if self.num_tasks == 1 else f"{self.prefix}_task{task:05d}"
