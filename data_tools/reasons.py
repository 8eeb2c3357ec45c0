"""Why a record did not become a document of the output, one code per reason."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Reason(IntEnum):
    """Outcome of one input record; every value but OK is counted as a drop."""

    OK = 0
    EMPTY_LINE = 1  # a blank line in a jsonl file
    INVALID_JSON = 2  # not JSON, or JSON that is not an object
    MISSING_FIELD = 3  # the text field is absent or null
    WRONG_TYPE = 4  # the text field is not a string
    INVALID_UTF8 = 5  # undecodable bytes or lone surrogates
    EMPTY = 6  # nothing but whitespace after cleaning
    TOO_SHORT = 7
    TOO_LONG = 8
    LOW_ALPHA = 9
    REPEATED_LINES = 10
    DUPLICATE = 11  # the same text (after cleaning) was kept earlier in the run
    CORRUPT_FILE = 12  # an unreadable file, or the rest of a truncated one
    NEAR_DUPLICATE = 13  # in a MinHash cluster whose first document was kept (--near-dedup)

    @property
    def label(self) -> str:
        return self.name.lower()


def count_reasons(codes) -> dict[str, int]:
    """{reason label: count} for the drop codes in an integer array."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=len(Reason))
    return {Reason(code).label: int(n) for code, n in enumerate(counts) if code and n}
