"""Quality filters of the Gopher and C4 papers, for megagpt-preprocess --filters.

Run after the other cleaning steps, in this order:
- Gopher quality (Rae et al. 2021, appendix A.1.1) and Gopher repetition (table A1):
  a document failing a rule is dropped, counted under that rule's Reason.
- C4 (Raffel et al. 2020, section 2.2), last because it changes the text: as in the
  paper, lines without terminal punctuation, with fewer than 3 words, or mentioning
  javascript are removed, and, as in C4's code, cookie and terms-of-use notices and
  lines with a word over 1,000 characters; the document goes on with its other lines,
  joined by single newlines as C4 did, and that is the text tokenized and hashed. A
  document containing "lorem ipsum" or "{", or with fewer than 5 sentences left, is
  dropped. Removed lines are not counted (only dropped documents are).
The thresholds and their names are in data_tools/quality_settings.py.

Where the papers leave a choice (each also said at the setting):
- Words are whitespace-separated tokens; a token of punctuation alone is not a word, and
  punctuation around a word is not part of its length (as a word tokenizer would split it).
- A "duplicate" line, paragraph or n-gram is every copy of one that occurs more than
  once (the paper's "all duplicate n-grams"), and the characters of overlapping n-grams
  are counted once; fractions of characters are of the words' characters.
- The top n-gram counts only when it occurs at least twice (a short text of unique
  words is not repetitive), and ties go to the n-gram covering the most characters.
- "At least two of the stop words" means two different ones, in any case.
- C4's sentences are counted as runs of . ! ? followed by a space or the line end (C4
  used NLTK's punkt, a model download); a kept line counts as at least one sentence.
- C4's "lorem ipsum" and "{" rules look at the whole page, as the paper says (C4's code
  looked only at the lines that survived the line rules).

Speed: the rules run on every document of a corpus, so words are split once, counted
with str methods and map() (C loops), and the n-gram rules work on 64-bit word hashes
with numpy; the duplicate n-gram fractions shrink as n grows, so the larger n are only
computed while the smaller ones are close to a threshold.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from itertools import filterfalse, repeat

import numpy as np

from data_tools.quality_settings import (
    C4Rules,
    GopherQualityRules,
    GopherRepetitionRules,
    QualityFilters,
)
from data_tools.reasons import Reason

PASS = (Reason.OK, "")
BULLET_CHARACTERS = "•‣◦⁃●○▪▫■□◆◇►▶➢"
BULLETS = (*BULLET_CHARACTERS, "- ", "* ")  # a line starting with one is a bullet point
PUNCTUATION = string.punctuation + "‘’“”«»‹›„‚—–…·¡¿" + BULLET_CHARACTERS
ELLIPSES = ("...", "…")
# A word without a letter: a run of non-space characters that are not letters (\w
# minus digits and underscore), from one space to the next.
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_SENTENCE_END = re.compile(r"[.!?]+['\"’”)\]]*(?=\s|$)")
C4_END_MARKS = (".", "!", "?", '"', "”")
# Cookie and terms-of-use notices, as C4's code (TFDS c4_utils) removed them.
C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so n-gram hashes stay spread


def apply_filters(text: str, filters: QualityFilters) -> tuple[str, Reason, str]:
    """(text, Reason.OK, "") or (text, the first failing rule, a line saying why).
    The text is changed only by the C4 line rules."""
    if filters.gopher_quality or filters.gopher_repetition:
        words = text.split()
        lines = list(filter(None, map(str.strip, text.split("\n"))))
        if filters.gopher_quality:
            reason, detail = gopher_quality(text, words, lines, filters.gopher_quality)
            if reason:
                return text, reason, detail
        if filters.gopher_repetition:
            reason, detail = gopher_repetition(text, words, lines, filters.gopher_repetition)
            if reason:
                return text, reason, detail
    if filters.c4:
        return c4(text, filters.c4)
    return text, Reason.OK, ""


def gopher_quality(
    text: str, words: list[str], lines: list[str], rules: GopherQualityRules
) -> tuple[Reason, str]:
    """Gopher's quality rules on a document's words and non-blank (stripped) lines."""
    if len(words) < rules.min_words:  # stripping punctuation only lowers the count
        return Reason.GOPHER_WORD_COUNT, f"{len(words)} tokens < {rules.min_words} words"
    stripped = list(filter(None, map(str.strip, words, repeat(PUNCTUATION))))
    count = len(stripped)
    if not rules.min_words <= count <= rules.max_words:
        detail = _outside("words", count, 0, rules.min_words, rules.max_words)
        return Reason.GOPHER_WORD_COUNT, detail
    mean = sum(map(len, stripped)) / max(1, count)
    low, high = rules.min_mean_word_length, rules.max_mean_word_length
    if not low <= mean <= high:
        return Reason.GOPHER_MEAN_WORD_LENGTH, _outside("mean word length", mean, 1, low, high)
    count = max(1, count)
    ratio = text.count("#") / count
    if ratio > rules.max_hash_to_word_ratio:
        return Reason.GOPHER_HASH_RATIO, _above("'#' per word", ratio, rules.max_hash_to_word_ratio)
    ratio = (text.count("...") + text.count("…")) / count
    if ratio > rules.max_ellipsis_to_word_ratio:
        limit = rules.max_ellipsis_to_word_ratio
        return Reason.GOPHER_ELLIPSIS_RATIO, _above("ellipses per word", ratio, limit)
    fraction = sum(map(str.startswith, lines, repeat(BULLETS))) / max(1, len(lines))
    if fraction > rules.max_bullet_line_fraction:
        limit = rules.max_bullet_line_fraction
        return Reason.GOPHER_BULLET_LINES, _above("bullet line fraction", fraction, limit)
    fraction = sum(map(str.endswith, lines, repeat(ELLIPSES))) / max(1, len(lines))
    if fraction > rules.max_ellipsis_line_fraction:
        limit = rules.max_ellipsis_line_fraction
        return Reason.GOPHER_ELLIPSIS_LINES, _above("ellipsis line fraction", fraction, limit)
    # Most words are all letters; the regex only looks at the others.
    others = " ".join(filterfalse(str.isalpha, stripped))
    fraction = 1 - len(_NO_LETTER_WORD.findall(others)) / count
    if fraction < rules.min_alpha_word_fraction:
        limit = rules.min_alpha_word_fraction
        return Reason.GOPHER_ALPHA_WORDS, f"alphabetic word fraction {fraction:.3g} < {limit:g}"
    found = len(_stop_words(rules.stop_words).intersection(map(str.lower, stripped)))
    if found < rules.min_stop_words:
        return Reason.GOPHER_STOP_WORDS, f"{found} different stop words < {rules.min_stop_words}"
    return PASS


def gopher_repetition(
    text: str, words: list[str], lines: list[str], rules: GopherRepetitionRules
) -> tuple[Reason, str]:
    """Gopher's repetition rules: duplicate lines, paragraphs and word n-grams."""
    checks = (
        ("line", lines, rules.max_duplicate_line_fraction, rules.max_duplicate_line_char_fraction),
        (
            "paragraph",
            list(filter(None, map(str.strip, _PARAGRAPH_BREAK.split(text)))),
            rules.max_duplicate_paragraph_fraction,
            rules.max_duplicate_paragraph_char_fraction,
        ),
    )
    for kind, items, max_items, max_chars in checks:
        item_fraction, char_fraction = duplicate_fractions(items)
        if item_fraction > max_items:
            reason = Reason[f"GOPHER_DUPLICATE_{kind.upper()}S"]
            return reason, _above(f"duplicate {kind} fraction", item_fraction, max_items)
        if char_fraction > max_chars:
            reason = Reason[f"GOPHER_DUPLICATE_{kind.upper()}_CHARS"]
            return reason, _above(f"duplicate {kind} character fraction", char_fraction, max_chars)
    return ngram_repetition(words, rules)


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items, fraction of their characters) in items occurring more than once."""
    if len(set(items)) == len(items):  # the common case, at the cost of a set
        return 0.0, 0.0
    repeated = [(item, n) for item, n in Counter(items).items() if n > 1]
    copies = sum(n for _, n in repeated)
    chars = sum(len(item) * n for item, n in repeated)
    return copies / len(items), chars / max(1, sum(map(len, items)))


def ngram_repetition(words: list[str], rules: GopherRepetitionRules) -> tuple[Reason, str]:
    """The top 2-4-gram and duplicate 5-10-gram character fractions of the words."""
    top = dict(rules.top_ngram_limits())
    duplicate = dict(rules.duplicate_ngram_limits())
    limits = sorted([*top.items(), *duplicate.items()])  # (n, limit), by n
    # Word hashes (str hashes are cached, so map(hash) is a C loop); an n-gram's hash is
    # its (n-1)-gram's times an odd constant plus its last word's, wrapping at 2**64.
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    ends = np.zeros(len(words) + 1, dtype=np.int64)  # characters before each word
    np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)), out=ends[1:])
    total = max(1, int(ends[-1]))
    hashes = ids
    for n in range(2, limits[-1][0] + 1):
        hashes = hashes[:-1] * _HASH_MULTIPLIER + ids[n - 1 :]
        order = hashes.argsort()
        ordered = hashes[order]
        same = ordered[1:] == ordered[:-1]
        if not same.any():
            break  # no n-gram repeats, so no longer one does
        repeated = np.zeros(len(ordered), dtype=bool)
        repeated[1:] = same
        repeated[:-1] |= same
        starts = np.sort(order[repeated])  # where the n-grams that occur twice or more start
        # The characters in repeated n-grams bound every later rule: the top n-gram's are
        # among them, and a repeated (n+1)-gram is made of repeated n-grams.
        fraction = _covered_chars(starts, n, ends) / total
        if fraction <= min(limit for m, limit in limits if m >= n):
            break
        if n in top and fraction > top[n]:
            top_fraction = _top_ngram_chars(hashes, starts, n, ends) / total
            if top_fraction > top[n]:
                name = f"top {n}-gram character fraction"
                return Reason.GOPHER_TOP_NGRAM, _above(name, top_fraction, top[n])
        if n in duplicate and fraction > duplicate[n]:
            name = f"duplicate {n}-gram character fraction"
            return Reason.GOPHER_DUPLICATE_NGRAMS, _above(name, fraction, duplicate[n])
    return PASS


def _top_ngram_chars(hashes: np.ndarray, starts: np.ndarray, n: int, ends: np.ndarray) -> int:
    """Characters covered by the most frequent of the repeated n-grams at `starts`; of
    those tied, the one covering the most characters, then the one seen first, so that
    the result never depends on the hash values (Python's differ between processes)."""
    _, first, inverse, counts = np.unique(
        hashes[starts], return_index=True, return_inverse=True, return_counts=True
    )
    first = starts[first]
    chars = ends[first + n] - ends[first]
    tied = np.flatnonzero(counts == counts.max())
    best = tied[np.lexsort((first[tied], -(chars[tied] * counts[tied])))[0]]
    return _covered_chars(starts[inverse.ravel() == best], n, ends)


def _covered_chars(starts: np.ndarray, n: int, ends: np.ndarray) -> int:
    """Characters of the words covered by n-grams at sorted `starts`, each counted once."""
    stops = starts + n
    stops[:-1] = np.minimum(stops[:-1], starts[1:])  # an overlap counts for the earlier one
    return int((ends[stops] - ends[starts]).sum())


def c4(text: str, rules: C4Rules) -> tuple[str, Reason, str]:
    """C4's rules: (kept lines joined by newlines, Reason.OK, "") or a drop."""
    if rules.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return text, Reason.C4_LOREM_IPSUM, "contains 'lorem ipsum'"
    if rules.drop_curly_bracket and "{" in text:
        return text, Reason.C4_CURLY_BRACKET, "contains '{'"
    kept, sentences = [], 0
    for line in filter(None, map(str.strip, text.split("\n"))):
        if rules.require_terminal_punctuation and (
            not line.endswith(C4_END_MARKS) or line.endswith("...")
        ):
            continue
        words = line.split()
        if len(words) < rules.min_words_per_line:
            continue
        if max(map(len, words)) > rules.max_word_length:
            continue
        lowered = line.lower()
        if rules.remove_javascript_lines and "javascript" in lowered:
            continue
        if rules.remove_policy_lines and any(p in lowered for p in C4_POLICY):
            continue
        kept.append(line)
        sentences += max(1, len(_SENTENCE_END.findall(line)))
    if sentences < rules.min_sentences:
        detail = f"{sentences} sentences in {len(kept)} kept lines < {rules.min_sentences}"
        return text, Reason.C4_TOO_FEW_SENTENCES, detail
    return "\n".join(kept), Reason.OK, ""


@lru_cache(maxsize=8)
def _stop_words(words: str) -> frozenset[str]:
    return frozenset(w.strip().lower() for w in words.split(",") if w.strip())


def _above(name: str, value: float, limit: float) -> str:
    return f"{name} {value:.4g} > {limit:g}"


def _outside(name: str, value: float, digits: int, low: float, high: float) -> str:
    side = f"< {low:g}" if value < low else f"> {high:g}"
    return f"{name} {value:.{digits}f} {side}"
