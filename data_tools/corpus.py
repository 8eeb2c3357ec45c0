"""Cleaned document texts of a corpus, streamed in one process (for tokenizer training
and other single-pass readers; megagpt-preprocess runs the same steps in parallel)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_tools.cleaning import CleaningOptions, clean
from data_tools.reasons import Reason
from data_tools.sources import read_file_batches
from data_tools.worker import batch_records


def iter_documents(
    files: list[Path],
    text_field: str = "text",
    cleaning: CleaningOptions | None = None,
    txt_unit: str = "file",
) -> Iterator[str]:
    """Texts that pass cleaning, file after file; bad records are skipped."""
    cleaning = cleaning or CleaningOptions()
    for index, path in enumerate(files):
        for batch in read_file_batches(path, index, txt_unit=txt_unit, text_field=text_field):
            oversized = set(batch.oversized)
            for record, (text, reason, _) in enumerate(batch_records(batch, text_field)):
                if reason != Reason.OK or record in oversized:
                    continue
                text, _, reason = clean(text, cleaning)
                if reason == Reason.OK:
                    yield text
