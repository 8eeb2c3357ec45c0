"""The text tokenizer training reads: lines for sentencepiece, cut where too long."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAX_LINE_BYTES = 4192
"""sentencepiece's max_sentence_length: it skips longer lines without a word."""
_CUT = (b". ", b"! ", b"? ", b"; ", "\u3002".encode())  # sentence ends, best first


@dataclass
class LineCounts:
    """What tokenizer training was given, for messages when it is too little."""

    texts: int = 0
    lines: int = 0
    long_lines: int = 0
    pieces: int = 0
    bytes: int = 0

    def describe(self) -> str:
        cut = (
            f", {self.long_lines:,} of them longer than {MAX_LINE_BYTES:,} bytes and cut into "
            f"{self.pieces:,} pieces"
            if self.long_lines
            else ""
        )
        return (
            f"{self.lines:,} non-empty lines ({self.bytes:,} bytes) from {self.texts:,} texts{cut}"
        )


def training_lines(texts: Iterable[str], counts: LineCounts | None = None) -> Iterator[str]:
    """The lines of `texts` as sentencepiece trains on them: stripped, non-empty, and
    none longer than MAX_LINE_BYTES (longer ones cut by `cut_line`)."""
    counts = counts if counts is not None else LineCounts()
    for text in texts:
        counts.texts += 1
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            counts.lines += 1
            data = line.encode("utf-8")
            counts.bytes += len(data)
            if len(data) <= MAX_LINE_BYTES:
                yield line
                continue
            counts.long_lines += 1
            for piece in cut_line(data, MAX_LINE_BYTES):
                counts.pieces += 1
                yield piece


def cut_line(data: bytes, limit: int) -> Iterator[str]:
    """UTF-8 `data` as pieces of at most `limit` bytes, each ending at the last sentence
    end in its window, else at the last space, else at a character boundary."""
    start = 0
    while len(data) - start > limit:
        window = data[start : start + limit]
        cut = max(window.rfind(mark) + len(mark) for mark in _CUT)
        if cut < limit // 2:  # no sentence end in the second half: the last space
            cut = window.rfind(b" ") + 1
        if cut < limit // 2:  # no space either (a URL, base64, CJK): a character boundary
            cut = limit
            while cut > 0 and data[start + cut] & 0xC0 == 0x80:  # inside a character
                cut -= 1
        piece = data[start : start + cut].decode("utf-8").strip()
        if piece:
            yield piece
        start += cut
    piece = data[start:].decode("utf-8").strip()
    if piece:
        yield piece
