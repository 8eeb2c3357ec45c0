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
    # --filters gopher-quality (Rae et al. 2021, appendix A.1.1)
    GOPHER_WORD_COUNT = 14
    GOPHER_MEAN_WORD_LENGTH = 15
    GOPHER_HASH_RATIO = 16  # '#' per word
    GOPHER_ELLIPSIS_RATIO = 17  # '...' and '…' per word
    GOPHER_BULLET_LINES = 18
    GOPHER_ELLIPSIS_LINES = 19
    GOPHER_ALPHA_WORDS = 20  # too few words with a letter
    GOPHER_STOP_WORDS = 21
    # --filters gopher-repetition (table A1)
    GOPHER_DUPLICATE_LINES = 22
    GOPHER_DUPLICATE_LINE_CHARS = 23
    GOPHER_DUPLICATE_PARAGRAPHS = 24
    GOPHER_DUPLICATE_PARAGRAPH_CHARS = 25
    GOPHER_TOP_NGRAM = 26  # the most frequent 2-, 3- or 4-gram
    GOPHER_DUPLICATE_NGRAMS = 27  # all repeated 5- to 10-grams
    # --filters c4 (Raffel et al. 2020, section 2.2; its line rules remove lines, not documents)
    C4_LOREM_IPSUM = 28
    C4_CURLY_BRACKET = 29
    C4_TOO_FEW_SENTENCES = 30  # after its line rules
    # --format sft and classify (data_tools/labeled.py)
    BAD_MESSAGES = 31  # neither {"messages": [{"role", "content"}, ...]} nor prompt/completion
    UNKNOWN_ROLE = 32  # a turn's role is not system, user or assistant
    EMPTY_COMPLETION = 33  # an empty completion or trained assistant turn
    NO_SUPERVISED_TOKEN = 34  # nothing to train: no assistant turn, or truncated away
    MARKER_IN_CONTENT = 35  # a message holds a template marker, which would forge a turn
    MISSING_LABEL = 36  # --format classify: the label field is absent or null
    UNKNOWN_LABEL = 37  # a label not among --labels

    @property
    def label(self) -> str:
        return self.name.lower()


def count_reasons(codes) -> dict[str, int]:
    """{reason label: count} for the drop codes in an integer array."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=len(Reason))
    return {Reason(code).label: int(n) for code, n in enumerate(counts) if code and n}
