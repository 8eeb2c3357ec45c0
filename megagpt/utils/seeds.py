"""Every random seed in megagpt is derived here, from the run's seed and a name or index.

Weights (per parameter name), dropout (per microbatch) and the data order (per split
and epoch) each draw from their own stream, so no stream depends on how many others
were drawn before it, nor on the layout.
"""

from __future__ import annotations

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-distributed 64-bit hash (wrapping math)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """Combine integers (seed, epoch, ...) into one 64-bit key, stably across runs."""
    key = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for part in parts:
            key = mix64(np.uint64(key) ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
    return int(key)
