"""Weighted mixtures of datasets, as Megatron's `--data-path "0.3 a 0.7 b"`.

Sample i of the blend is the i-th "tick" of a schedule in which dataset k ticks at
times (j + 0.5) / w_k, j = 0, 1, 2, ...: after n samples every dataset has supplied
within one sample of w_k * n. The schedule is computed on demand with a binary
search, so a blend needs no index arrays and starts instantly at any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BlendSchedule:
    """Maps a global blend index to (dataset number, index within that dataset).

    Dataset k's j-th sample is due at time (2j + 1) / (2 W_k), with W_k its weight in
    integer units (so ties compare exactly); samples are taken in order of due time,
    ties going to the lower dataset number.
    """

    UNITS = 1 << 16  # weight resolution: 1.5e-5 of the total

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64)
        self.units = np.maximum(1, np.round(w / w.sum() * self.UNITS)).astype(np.int64)

    def _position(self, k: int, j: np.ndarray) -> np.ndarray:
        """Global index of dataset k's j-th sample: the number of samples due before it."""
        due = (2 * j + 1)[:, None] * self.units[None, :]  # compare (2i+1) W_k with this
        w_k = self.units[k]
        strictly_before = ((due - 1) // w_k + 1) // 2
        at_or_before = (due // w_k + 1) // 2
        lower = np.arange(len(self.units)) < k
        return np.where(lower, at_or_before, strictly_before).sum(axis=1)

    def lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (dataset, sample within dataset) for each global index."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        dataset = np.full(indices.shape, -1, dtype=np.int64)
        within = np.zeros(indices.shape, dtype=np.int64)
        for k in range(len(self.units)):
            lo, hi = np.zeros_like(indices), indices.copy()  # answer j lies in [0, i]
            while np.any(lo < hi):  # smallest j with position(k, j) >= i
                mid = (lo + hi) // 2
                go_right = self._position(k, mid) < indices
                lo, hi = np.where(go_right, mid + 1, lo), np.where(go_right, hi, mid)
            hit = self._position(k, lo) == indices
            dataset[hit], within[hit] = k, lo[hit]
        return dataset, within
