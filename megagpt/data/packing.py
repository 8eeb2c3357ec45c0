"""Best-fit decreasing packing of fine-tuning examples into fixed-length windows.

Examples are placed longest first, each into the window whose free space is the
smallest that still holds it (a new window when none does): the classic best-fit
decreasing heuristic, which wastes little space on the typical mix of short and long
examples. Ties go to the example that comes first, and among windows with the same
free space to the one that reached it last, so the packing is a function of the
lengths alone: every rank and every resumed run computes
the same windows. The free-space lookup is a segment tree over the possible free sizes
(O(log capacity) per example), so packing a million examples takes seconds.
"""

from __future__ import annotations

import numpy as np


class _FreeSpace:
    """Windows by free space: for each size 0..capacity a stack of window numbers, and
    a segment tree of which sizes have any, to find the smallest size >= n."""

    def __init__(self, capacity: int):
        self.size = 1 << max(1, capacity).bit_length()
        self.count = [0] * (2 * self.size)
        self.stacks: dict[int, list[int]] = {}

    def push(self, free: int, window: int) -> None:
        self.stacks.setdefault(free, []).append(window)
        node = free + self.size
        while node:
            self.count[node] += 1
            node //= 2

    def pop_smallest_at_least(self, need: int) -> tuple[int, int] | None:
        """(free space, window) of the tightest window with room for `need`."""
        free = self._smallest_at_least(need)
        if free is None:
            return None
        window = self.stacks[free].pop()
        node = free + self.size
        while node:
            self.count[node] -= 1
            node //= 2
        return free, window

    def _smallest_at_least(self, need: int) -> int | None:
        if need >= self.size:
            return None
        node = need + self.size
        if self.count[node]:
            return need
        # Climb until a right sibling holds something, then descend to its leftmost leaf.
        while node > 1:
            if node % 2 == 0 and self.count[node + 1]:
                node += 1
                while node < self.size:
                    node = 2 * node if self.count[2 * node] else 2 * node + 1
                return node - self.size
            node //= 2
        return None


def pack_examples(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Windows (lists of example numbers, in placement order) holding every example
    once, none over `capacity` tokens. Every length must be 1..capacity."""
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))  # longest first
    windows: list[list[int]] = []
    free = _FreeSpace(capacity)
    for example in order.tolist():
        need = int(lengths[example])
        found = free.pop_smallest_at_least(need)
        if found is None:
            windows.append([example])
            left, window = capacity - need, len(windows) - 1
        else:
            room, window = found
            windows[window].append(example)
            left = room - need
        if left > 0:
            free.push(left, window)
    return windows


def one_per_window(count: int) -> list[list[int]]:
    """No packing: every example alone in its window (the rest is padding)."""
    return [[example] for example in range(count)]
