"""--format classify: texts with labels into tokens and one label id per example.

Each row's text is tokenized and EOD appended (a classifier reads the hidden state at
that last token), and its label mapped to an id: the position of its name in --labels,
or, without --labels, in the names found in a first pass over the input, sorted
(numerically when every name is an integer). Labels are strings, integers or booleans;
a JSON 1 and "1" are the same label.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.labeled_rows import RowDrop, read_rows
from data_tools.reasons import Reason
from data_tools.state import atomic_write_json
from megagpt.data.labeled_format import LABELS_FILE_SUFFIX, LABELS_SUFFIX
from megagpt.tokenizer import Tokenizer


class ClassifyExamples:
    """Turns rows into (ids ending in EOD, [label id]); counts examples per label."""

    format = "classify"
    side_suffix = LABELS_SUFFIX
    side_dtype = np.int32
    eod_appended = True  # kept last when an example is truncated

    def __init__(
        self,
        tokenizer: Tokenizer,
        text_field: str,
        label_field: str,
        labels: list[str],
        max_tokens: int | None,
        overlong: str,
    ):
        self.tokenizer, self.text_field, self.label_field = tokenizer, text_field, label_field
        self.labels = labels
        self.ids = {name: i for i, name in enumerate(labels)}
        self.max_tokens, self.overlong = max_tokens, overlong
        self.truncated = 0
        self.per_label: Counter[str] = Counter()

    def example(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """The ids of one row's text (EOD last) and its label id.

        Raises:
            RowDrop: No text or label, a label not among the names, or too long.
        """
        text, name = text_and_label(row, self.text_field, self.label_field)
        if name not in self.ids:
            raise RowDrop(Reason.UNKNOWN_LABEL, f"label {name!r} is not one of --labels")
        ids = [*self.tokenizer.encode(text), self.tokenizer.eod_id]
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            if self.overlong == "drop":
                raise RowDrop(
                    Reason.TOO_LONG, f"{len(ids):,} tokens > --max-tokens {self.max_tokens:,}"
                )
            ids = [*ids[: self.max_tokens - 1], self.tokenizer.eod_id]  # EOD stays last
            self.truncated += 1
        self.per_label[name] += 1
        return ids, [self.ids[name]]

    def write_files(self, prefix: str) -> dict[str, Any]:
        """Save the label names beside the output; the manifest's fields of this format."""
        atomic_write_json(Path(prefix + LABELS_FILE_SUFFIX), self.labels)
        return {
            "format": self.format,
            "labels": self.labels,
            "labels_file": Path(prefix + LABELS_FILE_SUFFIX).name,
            "labels_suffix": LABELS_SUFFIX,
        }

    def side_files(self, prefix: str) -> list[Path]:
        return [Path(prefix + LABELS_FILE_SUFFIX)]

    def summary(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "label_counts": {name: self.per_label[name] for name in self.labels},
            "truncated": self.truncated,
        }


def text_and_label(row: dict[str, Any], text_field: str, label_field: str) -> tuple[str, str]:
    """A row's text and label name.

    Raises:
        RowDrop: The text or label is missing, empty or of the wrong type.
    """
    text = row.get(text_field)
    if text is None:
        raise RowDrop(Reason.MISSING_FIELD, f"no {text_field!r} field (keys: {list(row)[:5]})")
    if not isinstance(text, str):
        raise RowDrop(Reason.WRONG_TYPE, f"{text_field!r} is a {type(text).__name__}")
    if not text.strip():
        raise RowDrop(Reason.EMPTY, f"{text_field!r} is empty")
    label = row.get(label_field)
    if label is None or label == "":
        raise RowDrop(Reason.MISSING_LABEL, f"no {label_field!r} field (keys: {list(row)[:5]})")
    if isinstance(label, bool):
        return text, json.dumps(label)  # true, false
    if isinstance(label, (str, int)):
        return text, str(label)
    raise RowDrop(
        Reason.WRONG_TYPE, f"{label_field!r} is a {type(label).__name__}, not a string or integer"
    )


def collect_labels(
    files: list[Path], text_field: str, label_field: str, batch_bytes: int, max_record_bytes: int
) -> list[str]:
    """The label names of the rows that would be kept, sorted (see `sort_labels`)."""
    names: set[str] = set()
    for batch in read_rows(files, batch_bytes, max_record_bytes):
        for row in batch.rows:
            if row.data is None:
                continue
            try:
                names.add(text_and_label(row.data, text_field, label_field)[1])
            except RowDrop:
                continue
    return sort_labels(names)


def sort_labels(names) -> list[str]:
    """Numeric order when every name is an integer ("2" before "10"), else sorted."""
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)
