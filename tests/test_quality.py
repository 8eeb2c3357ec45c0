"""Quality filters (--filters gopher,c4): each rule at the papers' thresholds, the
overrides and their errors, and megagpt-preprocess end to end with the filters on."""

import gzip
import json
import logging
from fractions import Fraction

import pytest

from data_tools.cleaning import CleaningOptions, clean, clean_and_explain
from data_tools.quality_settings import (
    GopherRepetitionRules,
    QualityFilters,
    quality_filters_from_args,
)
from data_tools.reasons import Reason
from data_tools.sources import InputError
from tests.test_preprocess import (
    DIRTY_RECORDS,
    expected_tokens,
    run,
    shard_documents,
    write_jsonl,
)


def check(text, names, *overrides):
    """(reason, detail, cleaned text) of `text` with the filters `names` on."""
    options = CleaningOptions(filters=quality_filters_from_args(names, overrides))
    cleaned = clean_and_explain(text, options)
    return cleaned.reason, cleaned.detail, cleaned.text


def unique_words(count, start=0):
    """Distinct 5-letter words with no digits (so every one counts as alphabetic)."""
    letters = "bcdfghjklmnpqrstvwxz"
    words = []
    for i in range(start, start + count):
        word = ""
        for _ in range(4):
            i, r = divmod(i, len(letters))
            word += letters[r]
        words.append("w" + word)
    return words


def prose(count, start=0):
    """`count` words passing every Gopher rule: two stop words, then distinct words."""
    return " ".join(["the", "of", *unique_words(count - 2, start)])


# Gopher quality: each rule just inside and just outside the paper's threshold.


def test_word_count_bounds_are_50_and_100000():
    assert check(prose(50), "gopher-quality")[0] == Reason.OK
    assert check(prose(49), "gopher-quality")[0] == Reason.GOPHER_WORD_COUNT
    # tokens of punctuation alone are not words
    assert check(prose(49) + " - — ...", "gopher-quality")[0] == Reason.GOPHER_WORD_COUNT
    assert check(prose(100_000), "gopher-quality")[0] == Reason.OK
    reason, detail, _ = check(prose(100_001), "gopher-quality")
    assert reason == Reason.GOPHER_WORD_COUNT and detail == "words 100001 > 100000"


def words_of_total_length(count, total):
    """`count` words ("the", "of", then letters) whose lengths add up to `total`."""
    rest = total - 5
    base, extra = divmod(rest, count - 2)
    return " ".join(["the", "of", *("x" * (base + (i < extra)) for i in range(count - 2))])


def test_mean_word_length_is_between_3_and_10():
    assert check(words_of_total_length(50, 150), "gopher-quality")[0] == Reason.OK  # 3.0
    assert check(words_of_total_length(50, 149), "gopher-quality")[0] == (
        Reason.GOPHER_MEAN_WORD_LENGTH
    )
    assert check(words_of_total_length(50, 500), "gopher-quality")[0] == Reason.OK  # 10.0
    reason, detail, _ = check(words_of_total_length(50, 501), "gopher-quality")
    assert reason == Reason.GOPHER_MEAN_WORD_LENGTH and detail == "mean word length 10.0 > 10"
    # punctuation around words is not part of their length
    quoted = " ".join(f'"{w}",' for w in words_of_total_length(50, 500).split())
    assert check(quoted, "gopher-quality")[0] == Reason.OK


@pytest.mark.parametrize("symbol, reason", [("#", "HASH"), ("...", "ELLIPSIS"), ("…", "ELLIPSIS")])
def test_symbol_to_word_ratio_is_at_most_0_1(symbol, reason):
    def doc(symbols):
        words = prose(50).split()
        return " ".join(w + symbol if i < symbols else w for i, w in enumerate(words))

    assert check(doc(5), "gopher-quality")[0] == Reason.OK
    assert check(doc(6), "gopher-quality")[0] == Reason[f"GOPHER_{reason}_RATIO"]


@pytest.mark.parametrize("bullet", ["•", "- ", "* ", "▪"])
def test_at_most_90_percent_of_lines_start_with_a_bullet(bullet):
    words = prose(300).split()

    def doc(bullets):
        lines = [" ".join(words[3 * i : 3 * i + 3]) for i in range(100)]
        return "\n".join(bullet + line if i < bullets else line for i, line in enumerate(lines))

    assert check(doc(90), "gopher-quality")[0] == Reason.OK
    assert check(doc(91), "gopher-quality")[0] == Reason.GOPHER_BULLET_LINES


def test_at_most_30_percent_of_lines_end_with_an_ellipsis():
    words = prose(100).split()

    def doc(ellipses):
        lines = [" ".join(words[10 * i : 10 * i + 10]) for i in range(10)]
        return "\n\n".join(line + "…" if i < ellipses else line for i, line in enumerate(lines))

    assert check(doc(3), "gopher-quality")[0] == Reason.OK
    reason, detail, _ = check(doc(4), "gopher-quality")
    assert reason == Reason.GOPHER_ELLIPSIS_LINES and detail == "ellipsis line fraction 0.4 > 0.3"


def test_at_least_80_percent_of_words_have_a_letter():
    words = prose(50).split()
    assert check(" ".join(words[:40] + ["1999"] * 10), "gopher-quality")[0] == Reason.OK
    numbers = " ".join(words[:39] + ["3.14", "(42)", "$5", "1_000"] + ["12"] * 7)
    reason, detail, _ = check(numbers, "gopher-quality")
    assert reason == Reason.GOPHER_ALPHA_WORDS and detail == "alphabetic word fraction 0.78 < 0.8"
    assert check(" ".join(words[:40] + ["x1"] * 10), "gopher-quality")[0] == Reason.OK


def test_at_least_two_different_stop_words():
    others = unique_words(48)
    assert check(" ".join(["The", "WITH", *others]), "gopher-quality")[0] == Reason.OK
    reason, detail, _ = check(" ".join(["the", "the", *others]), "gopher-quality")
    assert reason == Reason.GOPHER_STOP_WORDS and detail == "1 different stop words < 2"


# Gopher repetition (table A1), on texts whose other measures are far from their limits.


def lines_with_copies(copies, copy, unique_lines, words_per_line=8):
    """`unique_lines` distinct lines, then `copies` copies of `copy`, interleaved."""
    words = unique_words(unique_lines * words_per_line)
    lines = [" ".join(words[i : i + words_per_line]) for i in range(0, len(words), words_per_line)]
    for k in range(copies):
        lines.insert(2 * k, copy)
    return lines


def test_duplicate_line_fraction_is_at_most_0_3():
    # every copy of a repeated line counts: 6 of 20 lines
    assert check("\n".join(lines_with_copies(6, "ok", 14)), "gopher-repetition")[0] == Reason.OK
    reason, detail, _ = check("\n".join(lines_with_copies(7, "ok", 13)), "gopher-repetition")
    assert (
        reason == Reason.GOPHER_DUPLICATE_LINES and detail == "duplicate line fraction 0.35 > 0.3"
    )


def test_duplicate_line_characters_are_at_most_0_2():
    # 8 unique lines of 8 five-letter words and 7 spaces: 47 characters each
    assert check("\n".join(lines_with_copies(2, "y" * 47, 8)), "gopher-repetition")[0] == (
        Reason.OK  # 94 of 470 characters
    )
    reason, _, _ = check("\n".join(lines_with_copies(2, "y" * 48, 8)), "gopher-repetition")
    assert reason == Reason.GOPHER_DUPLICATE_LINE_CHARS


def test_duplicate_paragraphs_are_at_most_0_3_and_their_characters_0_2():
    def doc(copies, copy, unique):
        words = unique_words(unique * 24)
        paragraphs = [
            "\n".join(" ".join(words[p * 24 + 8 * j : p * 24 + 8 * j + 8]) for j in range(3))
            for p in range(unique)
        ]
        for k in range(copies):
            paragraphs.insert(2 * k, copy)
        return "\n\n".join(paragraphs)

    # 3 of 10 paragraphs are copies of one (and 3 of 24 lines)
    assert check(doc(3, "ok", 7), "gopher-repetition")[0] == Reason.OK
    reason, _, _ = check(doc(4, "ok", 6), "gopher-repetition")
    assert reason == Reason.GOPHER_DUPLICATE_PARAGRAPHS
    # A 4-line paragraph of 143 characters twice, among 8 distinct ones of 143: 0.2 of the
    # paragraphs' characters (and 280 of 1,408 of the lines', as the newlines don't count).
    # The repeated paragraph is a repeated 4-gram too, so the n-gram rules are off here.
    no_ngram_rules = [
        f"gopher.max_{kind}_{n}gram_char_fraction=1"
        for kind, sizes in (("top", range(2, 5)), ("duplicate", range(5, 11)))
        for n in sizes
    ]
    copy = "\n".join(letter * 35 for letter in "abcd")
    assert check(doc(2, copy, 8), "gopher-repetition", *no_ngram_rules)[0] == Reason.OK
    reason, detail, _ = check(doc(2, copy + "d", 8), "gopher-repetition", *no_ngram_rules)
    assert reason == Reason.GOPHER_DUPLICATE_PARAGRAPH_CHARS
    assert detail == "duplicate paragraph character fraction 0.2011 > 0.2"


def repeated_ngram_doc(n, limit, outside):
    """One line: an n-gram of 2-letter words repeated among distinct filler words, its
    characters exactly `limit` of all (`outside`: one filler character fewer, just above)."""
    filler_per_char = 1 / Fraction(str(limit)) - 1
    copies = next(k for k in range(2, 100) if (2 * n * k * filler_per_char).denominator == 1)
    filler = int(2 * n * copies * filler_per_char) - outside
    count, extra = divmod(filler, 5)  # 5-letter words, `extra` of them with a sixth letter
    words = [word + "y" * (i < extra) for i, word in enumerate(unique_words(count))]
    gram = [chr(97 + i) * 2 for i in range(n)]
    step = count // copies
    out = []
    for k in range(copies):
        out += [*words[k * step : (k + 1) * step], *gram]
    return " ".join(out + words[copies * step :])


@pytest.mark.parametrize("n, limit", GopherRepetitionRules().top_ngram_limits())
def test_top_ngram_character_fractions_are_0_20_0_18_0_16(n, limit):
    assert (n, limit) == {2: (2, 0.20), 3: (3, 0.18), 4: (4, 0.16)}[n]
    assert check(repeated_ngram_doc(n, limit, False), "gopher-repetition")[0] == Reason.OK
    reason, detail, _ = check(repeated_ngram_doc(n, limit, True), "gopher-repetition")
    assert reason == Reason.GOPHER_TOP_NGRAM and detail.startswith(f"top {n}-gram character")


@pytest.mark.parametrize("n, limit", GopherRepetitionRules().duplicate_ngram_limits())
def test_duplicate_ngram_character_fractions_are_0_15_down_to_0_10(n, limit):
    assert limit == pytest.approx(0.15 - 0.01 * (n - 5))
    assert check(repeated_ngram_doc(n, limit, False), "gopher-repetition")[0] == Reason.OK
    reason, detail, _ = check(repeated_ngram_doc(n, limit, True), "gopher-repetition")
    assert reason == Reason.GOPHER_DUPLICATE_NGRAMS
    assert detail.startswith(f"duplicate {n}-gram character fraction")


def test_overlapping_ngrams_count_their_characters_once():
    # "aa aa aa ..." repeats the 4-gram "aa aa aa aa" 27 times, over the same 60 characters
    # of 660: 0.09, not 27 * 8 / 660 = 0.33
    doc = " ".join(["aa"] * 30 + unique_words(120))
    assert check(doc, "gopher-repetition")[0] == Reason.OK
    doc = " ".join(["aa"] * 40 + unique_words(120))  # 80 of 680 characters: 0.118 > 0.11
    reason, detail, _ = check(doc, "gopher-repetition")
    assert detail == "duplicate 9-gram character fraction 0.1176 > 0.11"


# C4: line rules remove lines, page rules drop the document.

GOOD_LINES = [
    "The river rises in the hills and runs to the sea.",
    "It floods every spring, when the snow melts.",
    'Farmers call it "the old road."',
    "Boats carried grain down it for centuries!",
    "Is it still navigable today?",
]


def test_c4_keeps_only_lines_ending_in_terminal_punctuation_with_three_words():
    bad = [
        "Home | About | Contact",  # no terminal punctuation
        "Read more...",  # an ellipsis is not an end mark
        "Thanks!",  # fewer than 3 words
        "Please enable JavaScript to view the comments.",
        "This site uses cookies to improve your experience.",
        "Word " + "x" * 1001 + ".",
    ]
    text = "\n".join(line for pair in zip(GOOD_LINES, bad) for line in pair) + "\n\n  "
    reason, _, cleaned = check(text, "c4")
    assert reason == Reason.OK and cleaned == "\n".join(GOOD_LINES)
    assert clean(text, CleaningOptions(filters=quality_filters_from_args("c4")))[1] == (
        cleaned.encode()
    )
    assert check("Two words.", "c4", "c4.min_sentences=0")[0] == Reason.EMPTY


def test_c4_needs_5_sentences_after_its_line_rules():
    assert check(" ".join(GOOD_LINES), "c4")[0] == Reason.OK  # one line, five sentences
    reason, detail, _ = check(" ".join(GOOD_LINES[:4]) + "\nno end mark here", "c4")
    assert reason == Reason.C4_TOO_FEW_SENTENCES
    assert detail == "4 sentences in 1 kept lines < 5"


@pytest.mark.parametrize(
    "extra, reason",
    [
        ("Lorem Ipsum dolor sit amet.", Reason.C4_LOREM_IPSUM),
        ("function f() { return 1; }", Reason.C4_CURLY_BRACKET),  # even on a removed line
    ],
)
def test_c4_drops_pages_with_lorem_ipsum_or_a_curly_bracket(extra, reason):
    assert check("\n".join([*GOOD_LINES, extra]), "c4")[0] == reason


# Presets, overrides and their errors.


def test_presets_and_overrides():
    assert not QualityFilters().enabled and not quality_filters_from_args(None).enabled
    both = quality_filters_from_args("gopher, c4")
    assert both.gopher_quality and both.gopher_repetition and both.c4
    only = quality_filters_from_args("gopher-repetition")
    assert only.gopher_repetition and not only.gopher_quality and not only.c4
    assert check(prose(20), "gopher-quality", "gopher.min_words=20")[0] == Reason.OK
    assert check(" ".join(GOOD_LINES[:1]), "c4", "c4.min_sentences=1")[0] == Reason.OK
    curly = "\n".join([*GOOD_LINES, "Use a dict like {1: 2} here."])
    assert check(curly, "c4", "c4.drop_curly_bracket=false")[0] == Reason.OK
    german = " ".join(["der", "die", *unique_words(48)])
    assert check(german, "gopher", "gopher.stop_words=der,die,das")[0] == Reason.OK


@pytest.mark.parametrize(
    "names, overrides, message",
    [
        ("gopher,c5", [], "unknown filter set 'c5'; choose from gopher, gopher-quality"),
        (None, ["gopher.min_words=5"], "without --filters"),
        ("gopher", ["gopher.min_word=5"], "no setting gopher.min_word; the gopher settings are "),
        ("gopher", ["gopher.min_words=many"], "'many' is not a whole number (default 50)"),
        ("gopher", ["gopher.min_words=2.5"], "'2.5' is not a whole number"),
        ("c4", ["c4.drop_curly_bracket=maybe"], "'maybe' is not true or false"),
        ("c4", ["c4.min_sentences=-1"], "give a finite value >= 0"),
        ("c4", ["min_sentences=1"], "expected PREFIX.SETTING=VALUE with PREFIX one of gopher, c4"),
        ("c4", ["gopher.min_words=5"], "gopher-quality filters, which are off; add gopher-quality"),
    ],
)
def test_bad_filter_options_are_input_errors(names, overrides, message):
    with pytest.raises(InputError, match="--filter") as error:
        quality_filters_from_args(names, overrides)
    assert message in str(error.value)


def test_bad_filter_options_stop_the_command_with_exit_code_2(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "x.jsonl", [prose(60)])
    assert run(tmp_path, [path], tokenizer, "--filters", "gopher,c5")[0] == 2
    err = capsys.readouterr().err
    assert "megagpt-preprocess: error: --filters gopher,c5: unknown filter set 'c5'" in err
    code, _ = run(
        tmp_path, [path], tokenizer, "--filters", "c4", "--filter-set", "c4.min_sentences=x"
    )
    assert code == 2
    assert "--filter-set c4.min_sentences=x: 'x' is not a whole number" in capsys.readouterr().err
    assert not list(tmp_path.glob("out/*.bin"))


# megagpt-preprocess end to end.


@pytest.fixture(scope="module")
def prose_documents(documents):
    """English prose that passes gopher,c4: six paragraphs of the Python reference per
    document, each unwrapped to one line (C4 keeps only lines ending a sentence)."""
    lines = [" ".join(p.split()) for p in dict.fromkeys(documents)]
    lines = [line for line in lines if line.endswith(".") and "{" not in line]
    groups = ["\n".join(lines[i : i + 6]) for i in range(0, len(lines) - 5, 6)]
    options = CleaningOptions(filters=quality_filters_from_args("gopher,c4"))
    kept = [g for g in groups if clean(g, options)[2] == Reason.OK]
    assert len(kept) > 0.8 * len(groups)  # the Python docs repeat some phrases (5-grams)
    return kept


def planted_documents(good):
    """(text, the rule that drops it) for bad documents that pass every earlier rule."""
    spam = " ".join(["buy cheap watches now"] * 40) + "."
    javascript = [  # mentions of javascript, worded so that they pass the Gopher rules
        "This site works best when JavaScript is switched on in your settings.",
        "Without JavaScript, the comments below cannot load.",
        "Our maps need JavaScript; please turn it on to view them.",
        "Videos are played by a JavaScript player that your browser has blocked.",
        "To see prices, allow javascript for this domain and reload.",
        "Reviews appear here once scripts (JavaScript) are allowed.",
    ]
    return [
        (good[0] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "c4_lorem_ipsum"),
        (good[1] + "\nIn Python, {1: 2} is a dict display.", "c4_curly_bracket"),
        ("It was the end of the page.\n" + "\n".join(javascript), "c4_too_few_sentences"),
        (
            "\n".join(f"• the price of {w} with tax" for w in unique_words(20)),
            "gopher_bullet_lines",
        ),
        (good[2] + ("\nClick here to subscribe to the newsletter." * 10), "gopher_duplicate_lines"),
        (good[3] + "\n" + spam, "gopher_top_ngram"),
        ("@@ ## $$ %% ^^ && ** !! ?? ++ == ~~ " * 20, "gopher_word_count"),
        (" ".join(f"#{w}" for w in good[4].split()), "gopher_hash_ratio"),
        (
            " ".join(["the", "of", *(f"{k}.{k}" for k in range(20)), *unique_words(30)]),
            "gopher_alpha_words",
        ),
        (
            " ".join(["the", "of", *("incomprehensibilities" for _ in range(60))]),
            "gopher_mean_word_length",
        ),
        (" ".join(unique_words(60)) + ".", "gopher_stop_words"),
    ]


def test_preprocess_with_filters_counts_each_rule_and_dirty_input(
    tmp_path, prose_documents, tokenizer, caplog
):
    good, more_good = prose_documents[5:20], prose_documents[20:60]
    planted = planted_documents(prose_documents)
    # C4 removes a line and keeps the document: what is tokenized is the rest
    trimmed = prose_documents[60].replace(
        "\n", "\nHome | About | Contact\nYou must enable JavaScript to use this site.\n", 1
    )
    records = [json.dumps({"text": t}).encode() for t in [*good, trimmed, *(t for t, _ in planted)]]
    dirty = [
        *DIRTY_RECORDS,
        b'{"text": "' + b"x" * (2 << 20) + b'"}',  # over --max-record-mb
    ]
    mixed = [line for pair in zip(records, dirty) for line in pair] + records[len(dirty) :]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(mixed) + b"\n")
    tail = [json.dumps({"text": t}).encode() for t in more_good]
    whole = gzip.compress(b"\n".join(tail) + b"\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING):
        code, summary = run(
            tmp_path,
            [tmp_path / "mixed.jsonl", tmp_path / "cut.jsonl.gz"],
            tokenizer,
            "--filters",
            "gopher,c4",
            "--max-record-mb",
            "1",
        )
    assert code == 0
    assert summary["drops"] == {
        "empty_line": 1,
        "invalid_json": 2,
        "invalid_utf8": 3,
        "missing_field": 1,
        "wrong_type": 1,
        "empty": 1,
        "too_long": 1,
        "corrupt_file": 1,
        **{rule: 1 for _, rule in planted},
    }
    kept = shard_documents(tmp_path / "out/corpus_00000")
    assert kept == expected_tokens(tokenizer, [*good, prose_documents[60]])
    recovered = shard_documents(tmp_path / "out/corpus_00001")
    assert 0 < len(recovered) < len(more_good)
    assert recovered == expected_tokens(tokenizer, more_good[: len(recovered)])
    assert summary["documents_in"] == summary["documents_out"] + sum(summary["drops"].values())
    warnings = caplog.text
    assert "gopher_bullet_lines (bullet line fraction 1 > 0.9)" in warnings
    assert "gopher_mean_word_length (mean word length 20.4 > 10)" in warnings


def test_a_run_with_other_filters_does_not_resume(tmp_path, prose_documents, tokenizer, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", prose_documents[:5])
    assert run(tmp_path, [path], tokenizer, "--filters", "gopher")[0] == 0
    for changed in (
        ["--filters", "gopher,c4"],
        ["--filters", "gopher", "--filter-set", "gopher.min_words=10"],
        [],
    ):
        assert run(tmp_path, [path], tokenizer, *changed)[0] == 2
        assert "different cleaning" in capsys.readouterr().err
    assert run(tmp_path, [path], tokenizer, "--filters", "gopher")[0] == 0  # the same: resumes


def test_strict_names_the_rule_and_the_measure(tmp_path, tokenizer, capsys):
    long_words = " ".join(["the", "of", *("incomprehensibilities" for _ in range(60))])
    path = write_jsonl(tmp_path / "x.jsonl", [long_words])
    code, _ = run(tmp_path, [path], tokenizer, "--filters", "gopher", "--strict")
    assert code == 2
    assert f"{path}:1: gopher_mean_word_length: mean word length 20.4 > 10" in (
        capsys.readouterr().err
    )
