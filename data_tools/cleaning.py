"""Text cleaning and quality filters, applied to one document at a time.

Every step is optional. On by default: NFC normalization, removal of control
characters and of HTML markup, and the length bounds (these only remove what no
model should see). Off by default: the quality filters (alphabetic fraction,
repeated lines, and the Gopher and C4 rules of data_tools/quality.py, applied last),
because what counts as low quality depends on the corpus: code, tables and poetry
fail them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from data_tools.quality import apply_filters
from data_tools.quality_settings import QualityFilters
from data_tools.reasons import Reason

# C0/C1 control characters except tab, newline and carriage return, plus the
# replacement character and BOM that decoding leftovers and binary junk leave behind.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ufeff]+")
# Only markup that is unambiguously HTML: comments, script/style blocks with their
# content, and tags with a known HTML element name (so C++'s vector<int> survives).
_HTML_ELEMENTS = (
    "a|abbr|article|aside|b|blockquote|body|br|button|caption|center|cite|code|dd|div|dl|dt|"
    "em|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|label|li|link|main|"
    "meta|nav|noscript|ol|option|p|pre|section|select|small|span|strong|sub|sup|table|tbody|"
    "td|textarea|tfoot|th|thead|title|tr|tt|u|ul"
)
_MARKUP = re.compile(
    r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->|<!DOCTYPE[^>]*>"
    rf"|</?(?:{_HTML_ELEMENTS})"  # and only well-formed attributes: a<b && c>d is code
    r"""(?:\s+[\w:-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>=`]+))?)*\s*/?>""",
    re.IGNORECASE | re.DOTALL,
)
_C0_BYTES = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])
_C1_UTF8 = re.compile(rb"\xc2[\x80-\x9f]")  # U+0080..U+009F, as UTF-8
_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_ASCII = bytes(range(128))
_WHITESPACE = b" \t\n\r\x0b\x0c"


@dataclass(frozen=True)
class CleaningOptions:
    """What `clean` does; see the module docstring for the defaults."""

    normalize: bool = True
    strip_control: bool = True
    strip_markup: bool = True
    min_chars: int = 1
    max_chars: int = 1_000_000
    min_alpha_fraction: float = 0.0
    max_repeated_line_fraction: float = 1.0
    filters: QualityFilters = QualityFilters()  # --filters: none by default


class Cleaned(NamedTuple):
    text: str
    data: bytes  # the text as UTF-8, hashed for deduplication; b"" if unencodable
    reason: Reason
    detail: str = ""  # why it was dropped, for the log


def clean(text: str, options: CleaningOptions) -> tuple[str, bytes, Reason]:
    """Clean one document. Returns (text, its UTF-8 bytes, Reason.OK) or a drop reason.

    The UTF-8 bytes are returned because the caller hashes them for deduplication.
    """
    return clean_and_explain(text, options)[:3]


def clean_and_explain(text: str, options: CleaningOptions) -> Cleaned:
    """`clean`, and for a dropped document a line saying why (e.g. "mean word length
    12.3 > 10"), measured on the way at no extra cost."""
    if len(text) > options.max_chars * 4:  # far too long: skip the work below
        return Cleaned(
            text,
            b"",
            Reason.TOO_LONG,
            f"{len(text):,} characters > --max-chars {options.max_chars:,}",
        )
    if options.strip_markup and "<" in text:
        text = _MARKUP.sub("", text)
    if options.strip_control and _has_control(text):
        text = _CONTROL.sub("", text)
    if options.normalize and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates, from "\ud800" escapes in JSON
        return Cleaned(text, b"", Reason.INVALID_UTF8, str(error))
    if not text.strip():
        return Cleaned(text, data, Reason.EMPTY, "nothing left after cleaning")
    if len(text) < options.min_chars:
        return Cleaned(
            text,
            data,
            Reason.TOO_SHORT,
            f"{len(text):,} characters < --min-chars {options.min_chars:,}",
        )
    if len(text) > options.max_chars:
        return Cleaned(
            text,
            data,
            Reason.TOO_LONG,
            f"{len(text):,} characters > --max-chars {options.max_chars:,}",
        )
    if options.min_alpha_fraction > 0:
        fraction = alpha_fraction(text, data)
        if fraction < options.min_alpha_fraction:
            detail = f"letter fraction {fraction:.3g} < {options.min_alpha_fraction:g}"
            return Cleaned(text, data, Reason.LOW_ALPHA, detail)
    if options.max_repeated_line_fraction < 1:
        fraction = repeated_line_fraction(text)
        if fraction > options.max_repeated_line_fraction:
            detail = (
                f"repeated line fraction {fraction:.3g} > {options.max_repeated_line_fraction:g}"
            )
            return Cleaned(text, data, Reason.REPEATED_LINES, detail)
    if options.filters.enabled:
        filtered, reason, detail = apply_filters(text, options.filters)
        if reason != Reason.OK:
            return Cleaned(text, data, reason, detail)
        if filtered != text:  # C4 removed lines: what is tokenized and hashed is the rest
            text, data = filtered, filtered.encode("utf-8")
            if not text.strip():
                return Cleaned(text, data, Reason.EMPTY, "no line passed the C4 line rules")
            if len(text) < options.min_chars:
                detail = f"{len(text):,} characters < --min-chars after the C4 line rules"
                return Cleaned(text, data, Reason.TOO_SHORT, detail)
    return Cleaned(text, data, Reason.OK)


def _has_control(text: str) -> bool:
    """Whether _CONTROL would match, found on the UTF-8 bytes: byte searches run at
    memory speed, a character regex over every document costs ~5% of tokenizing."""
    data = text.encode("utf-8", "surrogatepass")
    return (
        len(data.translate(None, _C0_BYTES)) != len(data)
        or b"\xef\xbf\xbd" in data  # U+FFFD
        or b"\xef\xbb\xbf" in data  # U+FEFF
        or (b"\xc2" in data and _C1_UTF8.search(data) is not None)
    )


def alpha_fraction(text: str, data: bytes) -> float:
    """Fraction of non-space characters that are letters. Counted on bytes for speed:
    ASCII letters exactly, and every non-ASCII character as a letter (in text that
    survived decoding they nearly all are: accents, other scripts)."""
    ascii_count = len(data) - len(data.translate(None, _ASCII))
    non_ascii_chars = len(text) - ascii_count
    letters = len(data) - len(data.translate(None, _ASCII_LETTERS)) + non_ascii_chars
    spaces = len(data) - len(data.translate(None, _WHITESPACE))
    return letters / max(1, len(text) - spaces)


def repeated_line_fraction(text: str) -> float:
    """Fraction of non-blank lines that repeat an earlier line (Gopher's filter)."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0
