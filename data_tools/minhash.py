"""MinHash signatures and LSH band keys of documents, computed a batch at a time in numpy.

A document's shingles are its word n-grams (5 by default). Words are maximal runs of
ASCII letters and digits and non-ASCII characters, after ASCII case folding, so
punctuation, spacing and capitals do not tell two documents apart. Each word is hashed
with a polynomial over its bytes, each shingle by combining its words' hashes, both
vectorized over the whole batch (no Python loop per word: that loop is what bounds
the per-document throughput of pure-Python MinHash).

The signature is `bands × rows` minima of the 64-bit shingle hashes under as many
random multiply-add-shift hash functions (a·x + b mod 2^64, top 32 bits). Two
documents whose shingle sets have Jaccard similarity J agree on one minimum with
probability ≈ J, on a whole band with J^rows, and share at least one band key with
1 - (1 - J^rows)^bands: the S-curve whose midpoint is ≈ (1/bands)^(1/rows). A
document with fewer words than a shingle has one shingle of all its words; one with no
word at all gets a signature derived from its exact content hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
_WORD_BYTE = np.zeros(256, dtype=bool)
for _low, _high in ((48, 57), (65, 90), (97, 122), (128, 255)):
    _WORD_BYTE[_low : _high + 1] = True
_BYTE_BASE = 0x100000001B3  # odd, so it has an inverse modulo 2^64
_SHINGLE_BASE = 0x9E3779B97F4A7C15
_ROW_BASE = 0xC2B2AE3D27D4EB4F
_CHUNK_SHINGLES = 1 << 14  # shingles × hash functions held at once: 14 MB at 112 hashes


@dataclass(frozen=True)
class MinHashSettings:
    """The LSH scheme; the defaults are datatrove's (14 bands of 8 rows, word 5-grams)."""

    bands: int = 14
    rows: int = 8
    shingle_words: int = 5
    seed: int = 1

    @property
    def num_hashes(self) -> int:
        return self.bands * self.rows

    @property
    def threshold(self) -> float:
        """The Jaccard similarity at the S-curve's steepest point, about where pairs
        start being caught more often than not."""
        return (1 / self.bands) ** (1 / self.rows)

    def catch_probability(self, jaccard: float) -> float:
        """Probability that a pair of documents at this Jaccard similarity shares a band."""
        return 1 - (1 - jaccard**self.rows) ** self.bands

    def describe(self) -> str:
        return (
            f"MinHash on word {self.shingle_words}-grams, {self.bands} bands x {self.rows} rows "
            f"(threshold ~{self.threshold:.2f}; pairs at Jaccard 0.7/0.8/0.9 caught with "
            f"probability {self.catch_probability(0.7):.2f}/{self.catch_probability(0.8):.2f}/"
            f"{self.catch_probability(0.9):.2f})"
        )


def settings_for_threshold(
    threshold: float, max_hashes: int = 112, shingle_words: int = 5
) -> MinHashSettings:
    """Bands and rows (bands × rows ≤ max_hashes) whose S-curve midpoint is closest to
    `threshold`; among equally close ones, the one using the most hash functions."""
    best = min(
        (abs((1 / b) ** (1 / r) - threshold), -b * r, b, r)
        for r in range(1, max_hashes + 1)
        for b in range(1, max_hashes // r + 1)
    )
    return MinHashSettings(bands=best[2], rows=best[3], shingle_words=shingle_words)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _inverse_mod_2_64(odd: int) -> int:
    inverse = odd
    for _ in range(6):  # Newton's iteration doubles the correct low bits each time
        inverse = inverse * (2 - odd * inverse) & MASK64
    return inverse


class MinHasher:
    """Signatures and band keys of batches of documents (UTF-8 bytes)."""

    def __init__(self, settings: MinHashSettings):
        self.settings = settings
        rng = np.random.default_rng(settings.seed)
        self.a = rng.integers(0, 1 << 63, settings.num_hashes, dtype=np.uint64) * np.uint64(
            2
        ) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, settings.num_hashes, dtype=np.uint64)
        self._powers = np.ones(1, dtype=np.uint64)
        self._inverse_powers = np.ones(1, dtype=np.uint64)
        self._band_salt = _mix64(np.arange(1, settings.bands + 1, dtype=np.uint64))
        self._row_powers = np.cumprod(
            np.full(settings.rows, _ROW_BASE, dtype=np.uint64), dtype=np.uint64
        )

    def band_keys(self, documents: list[bytes], exact_hashes: np.ndarray) -> np.ndarray:
        """(documents, bands) uint64: equal keys in a band mean a candidate pair.
        `exact_hashes` (S16, one per document) seed the signature of word-less ones."""
        signatures = self.signatures(documents, exact_hashes)
        rows = signatures.reshape(len(documents), self.settings.bands, self.settings.rows)
        combined = (rows * self._row_powers).sum(axis=2, dtype=np.uint64)
        return _mix64(combined ^ self._band_salt)

    def signatures(self, documents: list[bytes], exact_hashes: np.ndarray) -> np.ndarray:
        """(documents, bands × rows) uint64 minima, each below 2^32."""
        count = len(documents)
        signatures = np.full((count, self.settings.num_hashes), np.uint64(1 << 32))
        if not count:
            return signatures
        shingles, owners = self._shingles(documents)
        for start in range(0, len(shingles), _CHUNK_SHINGLES):
            self._fold_minima(
                signatures,
                shingles[start : start + _CHUNK_SHINGLES],
                owners[start : start + _CHUNK_SHINGLES],
            )
        wordless = np.flatnonzero(signatures[:, 0] == np.uint64(1 << 32))
        if len(wordless):
            seeds = np.frombuffer(
                np.asarray(exact_hashes, dtype="S16")[wordless].tobytes(), dtype=np.uint64
            )[::2]
            ladder = seeds[:, None] + np.arange(self.settings.num_hashes, dtype=np.uint64)
            signatures[wordless] = _mix64(ladder) >> np.uint64(32)
        return signatures

    def _fold_minima(self, signatures, shingles, owners) -> None:
        values = shingles[:, None] * self.a
        values += self.b
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        # The top 32 bits of the minimum are the minimum of the top 32 bits: shift after.
        minima = np.minimum.reduceat(values, starts, axis=0) >> np.uint64(32)
        docs = owners[starts]
        signatures[docs] = np.minimum(signatures[docs], minima)

    def _shingles(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Mixed 64-bit hashes of every shingle of the batch, and the index of the
        document each belongs to (non-decreasing)."""
        text = np.frombuffer(b"\n".join(documents).lower() + b"\n", dtype=np.uint8)
        doc_starts = np.zeros(len(documents), dtype=np.int64)
        np.cumsum([len(d) + 1 for d in documents[:-1]], out=doc_starts[1:])
        is_word = _WORD_BYTE[text]
        edges = np.diff(is_word.astype(np.int8), prepend=np.int8(0))
        word_starts = np.flatnonzero(edges == 1)
        word_ends = np.flatnonzero(edges == -1)  # the text ends in "\n", so every word ends
        if not len(word_starts):
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        words = self._word_hashes(text, is_word, word_starts, word_ends)
        owners = np.searchsorted(doc_starts, word_starts, side="right") - 1
        return self._word_ngrams(words, owners)

    def _word_hashes(self, text, is_word, word_starts, word_ends) -> np.ndarray:
        self._grow_powers(len(text))
        terms = np.where(is_word, text.astype(np.uint64) * self._powers[: len(text)], 0)
        sums = np.add.reduceat(terms, word_starts)  # each word to the next one's start
        hashes = sums * self._inverse_powers[word_starts]  # as if every word began at 0
        lengths = (word_ends - word_starts).astype(np.uint64)
        return _mix64(hashes + lengths * np.uint64(_SHINGLE_BASE))

    def _word_ngrams(self, words: np.ndarray, owners: np.ndarray):
        n = self.settings.shingle_words
        count = len(words)
        hashes = words.copy()
        for k in range(1, n):
            factor = np.uint64(pow(_SHINGLE_BASE, k, 1 << 64))
            same_doc = np.zeros(count, dtype=bool)
            same_doc[: count - k] = owners[k:] == owners[: count - k]
            shifted = np.zeros(count, dtype=np.uint64)
            shifted[: count - k] = words[k:]
            hashes += np.where(same_doc, shifted * factor, np.uint64(0))
        # A shingle starts at every word with n-1 words of its document after it, and
        # at the first word of a document shorter than n words.
        full = np.zeros(count, dtype=bool)
        full[: max(0, count - n + 1)] = owners[n - 1 :] == owners[: max(0, count - n + 1)]
        first = np.r_[True, owners[1:] != owners[:-1]]
        next_start = np.r_[np.flatnonzero(first)[1:], count]
        short_doc = np.zeros(count, dtype=bool)
        short_doc[first] = (next_start - np.flatnonzero(first)) < n
        keep = full | short_doc
        return _mix64(hashes[keep]), owners[keep]

    def _grow_powers(self, length: int) -> None:
        if len(self._powers) >= length:
            return
        size = max(length, 2 * len(self._powers))
        self._powers = np.cumprod(
            np.r_[np.uint64(1), np.full(size - 1, _BYTE_BASE, dtype=np.uint64)], dtype=np.uint64
        )
        inverse = _inverse_mod_2_64(_BYTE_BASE)
        self._inverse_powers = np.cumprod(
            np.r_[np.uint64(1), np.full(size - 1, inverse, dtype=np.uint64)], dtype=np.uint64
        )
