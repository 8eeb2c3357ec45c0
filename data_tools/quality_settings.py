"""The thresholds of the quality filters, their presets, and the command-line overrides.

    --filters gopher,c4 --filter-set gopher.min_words=20 --filter-set c4.min_sentences=3

Every default is the paper's value (see data_tools/quality.py for the rules themselves).
All fields are plain numbers, booleans or strings, so `dataclasses.asdict` of the
settings is JSON and a run restarted with other filters is refused like any other
changed setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from data_tools.sources import InputError


@dataclass(frozen=True)
class GopherQualityRules:
    """Rae et al. 2021 ("Scaling Language Models"), appendix A.1.1: a document failing
    any rule is dropped."""

    min_words: int = 50
    """Fewer words than this: dropped (tokens of punctuation alone are not words)."""
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    """Characters per word, punctuation around a word not counted."""
    max_mean_word_length: float = 10.0
    max_hash_to_word_ratio: float = 0.1
    """'#' characters per word."""
    max_ellipsis_to_word_ratio: float = 0.1
    """'...' and '…' per word."""
    max_bullet_line_fraction: float = 0.9
    """Of the non-blank lines, those starting with a bullet point."""
    max_ellipsis_line_fraction: float = 0.3
    """Of the non-blank lines, those ending with '...' or '…'."""
    min_alpha_word_fraction: float = 0.8
    """Of the words, those with at least one alphabetic character."""
    min_stop_words: int = 2
    """How many different words of `stop_words` a document must contain."""
    stop_words: str = "the,be,to,of,and,that,have,with"
    """Comma-separated, matched case-insensitively."""


@dataclass(frozen=True)
class GopherRepetitionRules:
    """Rae et al. 2021, table A1: a document failing any rule is dropped. Lines and
    paragraphs are compared stripped; the character fractions of n-grams are of the
    words' characters (whitespace not counted)."""

    max_duplicate_line_fraction: float = 0.30
    """Of the non-blank lines, those that occur more than once (every copy counts)."""
    max_duplicate_line_char_fraction: float = 0.20
    max_duplicate_paragraph_fraction: float = 0.30
    """Paragraphs are separated by blank lines."""
    max_duplicate_paragraph_char_fraction: float = 0.20
    max_top_2gram_char_fraction: float = 0.20
    """Characters covered by the most frequent word 2-gram (when it occurs twice or more)."""
    max_top_3gram_char_fraction: float = 0.18
    max_top_4gram_char_fraction: float = 0.16
    max_duplicate_5gram_char_fraction: float = 0.15
    """Characters covered by 5-grams that occur more than once, each character counted once."""
    max_duplicate_6gram_char_fraction: float = 0.14
    max_duplicate_7gram_char_fraction: float = 0.13
    max_duplicate_8gram_char_fraction: float = 0.12
    max_duplicate_9gram_char_fraction: float = 0.11
    max_duplicate_10gram_char_fraction: float = 0.10

    def top_ngram_limits(self) -> list[tuple[int, float]]:
        return [(n, getattr(self, f"max_top_{n}gram_char_fraction")) for n in (2, 3, 4)]

    def duplicate_ngram_limits(self) -> list[tuple[int, float]]:
        return [(n, getattr(self, f"max_duplicate_{n}gram_char_fraction")) for n in range(5, 11)]


@dataclass(frozen=True)
class C4Rules:
    """Raffel et al. 2020 (T5), section 2.2, with the line rules removing lines as the
    paper does (the kept text is what gets tokenized) and the page rules dropping the
    document. The two rules only in the code that built C4 (TFDS c4_utils) are on too."""

    require_terminal_punctuation: bool = True
    """Remove lines not ending in . ! ? or a closing quote (or ending in '...')."""
    min_words_per_line: int = 3
    """Remove lines with fewer words (the paper's value; C4's code used 5)."""
    remove_javascript_lines: bool = True
    """Remove lines containing 'javascript' (any case)."""
    remove_policy_lines: bool = True
    """Remove cookie and terms-of-use notices (C4's code, not the paper)."""
    max_word_length: int = 1000
    """Remove lines with a longer word (C4's code, not the paper)."""
    drop_lorem_ipsum: bool = True
    """Drop documents containing 'lorem ipsum' (any case)."""
    drop_curly_bracket: bool = True
    """Drop documents containing '{' (likely code)."""
    min_sentences: int = 5
    """Drop documents with fewer sentences in their kept lines (the paper's value; C4's
    code used 3)."""


@dataclass(frozen=True)
class QualityFilters:
    """Which rule sets run (None: off) and their thresholds."""

    gopher_quality: GopherQualityRules | None = None
    gopher_repetition: GopherRepetitionRules | None = None
    c4: C4Rules | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.gopher_quality or self.gopher_repetition or self.c4)


PRESETS: dict[str, tuple[str, ...]] = {
    "gopher": ("gopher_quality", "gopher_repetition"),
    "gopher-quality": ("gopher_quality",),
    "gopher-repetition": ("gopher_repetition",),
    "c4": ("c4",),
}
"""--filters names and the QualityFilters fields each turns on."""

RULE_SETS = {
    "gopher_quality": GopherQualityRules,
    "gopher_repetition": GopherRepetitionRules,
    "c4": C4Rules,
}
PREFIXES = {"gopher": ("gopher_quality", "gopher_repetition"), "c4": ("c4",)}
"""--filter-set NAME prefixes and the rule sets whose settings they name."""


def quality_filters_from_args(names: str | None, overrides: Sequence[str] = ()) -> QualityFilters:
    """The filters that `--filters NAMES` and `--filter-set` OVERRIDES select."""
    if not names:
        if overrides:
            raise InputError(
                f"--filter-set {overrides[0]} without --filters: also name the filters to "
                f"turn on, e.g. --filters gopher,c4 (choose from {', '.join(PRESETS)})"
            )
        return QualityFilters()
    chosen: dict[str, object] = {}
    for name in (n.strip() for n in names.split(",")):
        if name not in PRESETS:
            raise InputError(
                f"--filters {names}: unknown filter set {name!r}; choose from "
                f"{', '.join(PRESETS)} (comma-separated)"
            )
        for field_name in PRESETS[name]:
            chosen[field_name] = RULE_SETS[field_name]()
    for override in overrides:
        field_name, setting, value = _parse_override(override, chosen)
        chosen[field_name] = replace(chosen[field_name], **{setting: value})
    return QualityFilters(**chosen)


def _parse_override(override: str, chosen: dict[str, object]) -> tuple[str, str, object]:
    """(rule set field, setting, typed value) of one PREFIX.SETTING=VALUE."""
    name, equals, text = override.partition("=")
    prefix, dot, setting = name.strip().partition(".")
    if not equals or not dot or prefix not in PREFIXES:
        raise InputError(
            f"--filter-set {override}: expected PREFIX.SETTING=VALUE with PREFIX one of "
            f"{', '.join(PREFIXES)}, e.g. gopher.min_words=20"
        )
    for field_name in PREFIXES[prefix]:
        defaults = {f.name: f.default for f in fields(RULE_SETS[field_name])}
        if setting not in defaults:
            continue
        if field_name not in chosen:
            preset = field_name.replace("_", "-")
            raise InputError(
                f"--filter-set {override}: {prefix}.{setting} belongs to the {preset} "
                f"filters, which are off; add {preset} (or {prefix}) to --filters"
            )
        return field_name, setting, _typed(override, text.strip(), defaults[setting])
    valid = [f.name for field_name in PREFIXES[prefix] for f in fields(RULE_SETS[field_name])]
    raise InputError(
        f"--filter-set {override}: no setting {prefix}.{setting}; the {prefix} settings "
        f"are {', '.join(valid)}"
    )


def _typed(override: str, text: str, default: object) -> object:
    """`text` as the type of `default`, or an InputError saying what would work."""
    expected = {bool: "true or false", int: "a whole number", float: "a number"}
    try:
        if isinstance(default, bool):
            value = _BOOLEANS[text.lower()]
        elif isinstance(default, int):
            number = float(text)  # accepts 1e5
            if not number.is_integer():
                raise ValueError(text)
            value = int(number)
        elif isinstance(default, float):
            value = float(text)
        else:  # the stop words
            value = ",".join(w.strip() for w in text.split(",") if w.strip())
            if not value:
                raise ValueError(text)
    except (ValueError, KeyError):
        what = expected.get(type(default), "comma-separated words")
        raise InputError(
            f"--filter-set {override}: {text!r} is not {what} (default {default})"
        ) from None
    if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
        raise InputError(f"--filter-set {override}: give a finite value >= 0 (default {default})")
    return value


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
