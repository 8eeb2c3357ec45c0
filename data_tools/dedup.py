"""Exact deduplication by 128-bit content hash, in memory that does not grow.

Hashes live in sorted runs, as in a log-structured merge tree: new ones collect in
a small in-memory run; when it is full it is sorted and written to disk, and runs of
similar size are merged (streaming, in chunks) so there are only O(log n) of them.
A lookup is a binary search in each run through a memory map, so the set can be far
larger than RAM; the operating system keeps the hot parts cached.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HASH_DTYPE = np.dtype("S16")


class DedupIndex:
    """A set of 16-byte hashes on disk under `directory` (which it owns and clears)."""

    def __init__(
        self, directory: str | Path, memory_entries: int = 1 << 20, merge_chunk: int = 1 << 20
    ):
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        self.memory_entries = memory_entries
        self.merge_chunk = merge_chunk
        self._memory: list[np.ndarray] = []  # sorted runs not yet on disk
        self._memory_size = 0
        self._runs: list[tuple[Path, np.ndarray]] = []  # on disk, oldest (largest) first
        self._next_name = 0
        self.size = 0

    def add_new(self, hashes: np.ndarray) -> np.ndarray:
        """Add `hashes`; return a mask of those seen for the first time (the first of
        equal hashes within the call counts as new)."""
        hashes = np.asarray(hashes, dtype=HASH_DTYPE)
        fresh = np.zeros(len(hashes), dtype=bool)
        if not len(hashes):
            return fresh
        unique, first = np.unique(hashes, return_index=True)
        unseen = ~self._contains(unique)
        fresh[first[unseen]] = True
        if unseen.any():
            self._memory.append(unique[unseen])
            self._memory_size += int(unseen.sum())
            self.size += int(unseen.sum())
            self._compact_memory()
        return fresh

    def _contains(self, sorted_keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(sorted_keys), dtype=bool)
        for run in [*self._memory, *(data for _, data in self._runs)]:
            position = np.searchsorted(run, sorted_keys)
            inside = position < len(run)
            found[inside] |= run[position[inside]] == sorted_keys[inside]
        return found

    def _compact_memory(self) -> None:
        # Binary-counter merging: a run is merged into the previous one while it is at
        # least half its size, which keeps log2(n) runs and O(n log n) total work.
        while len(self._memory) > 1 and len(self._memory[-1]) * 2 >= len(self._memory[-2]):
            newer = self._memory.pop()
            self._memory[-1] = np.union1d(self._memory[-1], newer)
        if self._memory_size >= self.memory_entries:
            merged = (
                self._memory[0]
                if len(self._memory) == 1
                else np.unique(np.concatenate(self._memory))
            )
            self._memory, self._memory_size = [], 0
            self._runs.append(self._write_run(merged))
            self._compact_disk()

    def _write_run(self, data: np.ndarray) -> tuple[Path, np.ndarray]:
        path = self._new_path()
        data.tofile(path)
        return path, np.memmap(path, dtype=HASH_DTYPE, mode="r")

    def _new_path(self) -> Path:
        self._next_name += 1
        return self.directory / f"run-{self._next_name:06d}.hashes"

    def _compact_disk(self) -> None:
        while len(self._runs) > 1 and len(self._runs[-1][1]) * 2 >= len(self._runs[-2][1]):
            newer_path, newer = self._runs.pop()
            older_path, older = self._runs.pop()
            path = self._new_path()
            with open(path, "wb") as out:
                for piece in _merge_sorted(older, newer, self.merge_chunk):
                    out.write(piece.tobytes())
            del older, newer
            older_path.unlink()
            newer_path.unlink()
            self._runs.append((path, np.memmap(path, dtype=HASH_DTYPE, mode="r")))
        log.debug("dedup index: %d hashes in %d runs on disk", self.size, len(self._runs))

    def close(self) -> None:
        self._runs.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def _merge_sorted(a: np.ndarray, b: np.ndarray, chunk: int):
    """Sorted pieces of the union of sorted, disjoint runs a and b, `chunk` at a time
    from a (plus the part of b that falls before its end): memory O(chunk)."""
    i = j = 0
    while i < len(a):
        a_piece = np.asarray(a[i : i + chunk])
        i += len(a_piece)
        j_end = len(b) if i == len(a) else int(np.searchsorted(b, a_piece[-1], side="right"))
        yield np.sort(np.concatenate([a_piece, np.asarray(b[j:j_end])]), kind="stable")
        j = j_end
    if j < len(b):
        for start in range(j, len(b), chunk):
            yield np.asarray(b[start : start + chunk])
