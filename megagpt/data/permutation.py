"""A seeded random permutation of [0, n) computed on demand, in O(1) memory.

Megatron shuffles samples with an index array it builds (and caches) at start-up;
for a trillion-token corpus that array is gigabytes and minutes of rank-0 time. A
Feistel network is a bijection on [0, 4^h) for any round function, and "cycle
walking" (re-applying it until the value falls below n) restricts it to a bijection
on [0, n). Each lookup costs a few integer hashes, and any epoch's order can be
computed from any position, which is what exact resume on another layout needs.
"""

from __future__ import annotations

import numpy as np

from megagpt.utils.seeds import derive_key, mix64

_ROUNDS = 8  # 8 rounds: correlation statistics indistinguishable from a random shuffle


def permute(indices: np.ndarray, n: int, key: int) -> np.ndarray:
    """Image of each index in [0, n) under the permutation selected by `key`."""
    indices = np.asarray(indices, dtype=np.uint64)
    if n <= 1:
        return indices.astype(np.int64)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for round_key in round_keys:
            left, right = right, left ^ (mix64(right ^ round_key) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        out = feistel(indices)
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = feistel(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)
