"""megagpt-merge, -inspect, -build-index, -train-tokenizer, the dedup index and cleaning."""

import json

import numpy as np
import pytest

from data_tools import build_index, inspect, merge, train_tokenizer
from data_tools.cleaning import CleaningOptions, clean
from data_tools.dedup import HASH_DTYPE, DedupIndex
from data_tools.reasons import Reason
from megagpt.data import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from megagpt.data.indexed import HEADER_SIZE
from megagpt.tokenizer import Tokenizer


def write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return str(prefix)


def test_merge_streams_all_inputs_in_order(tmp_path, capsys):
    rng = np.random.default_rng(0)
    parts = [[rng.integers(0, 500, rng.integers(1, 30)) for _ in range(n)] for n in (5, 0, 9, 3)]
    prefixes = [write(tmp_path / f"p{k}", docs) for k, docs in enumerate(parts)]
    assert merge.main([str(tmp_path / "p*.idx"), "--output-prefix", str(tmp_path / "all")]) == 0
    merged = IndexedDataset(tmp_path / "all")
    flat = [d.tolist() for docs in parts for d in docs]
    assert [merged[i].tolist() for i in range(len(merged))] == flat
    assert "17 documents" in capsys.readouterr().out
    assert (
        merge.main([*prefixes, "--output-prefix", str(tmp_path / "few"), "--shard-tokens", "150"])
        == 0
    )
    outputs = sorted(tmp_path.glob("few_*.idx"))
    assert len(outputs) > 1
    again = [IndexedDataset(str(p)[:-4]) for p in outputs]
    assert [d[i].tolist() for d in again for i in range(len(d))] == flat


def test_merge_refuses_mixed_dtypes_naming_them(tmp_path, capsys):
    write(tmp_path / "a", [[1, 2]], np.uint16)
    write(tmp_path / "b", [[1, 2]], np.int32)
    code = merge.main(
        [str(tmp_path / "a"), str(tmp_path / "b"), "--output-prefix", str(tmp_path / "m")]
    )
    assert code == 2 and "different token dtypes" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))


def test_inspect_prints_counts_histogram_and_decoded_documents(tmp_path, tokenizer, capsys):
    texts = ["The for statement iterates.", "A tuple is immutable, a list is not." * 5]
    prefix = write(tmp_path / "d", [[*tokenizer.encode(t), tokenizer.eod_id] for t in texts])
    assert (
        inspect.main(
            [prefix, "--tokenizer", str(tokenizer.path), "--documents", "1", "--samples", "0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 documents, 2 sequences" in out and "dtype uint16" in out
    lengths = [len(tokenizer.encode(t)) + 1 for t in texts]
    assert (
        sum(int(line.split()[3].replace(",", "")) for line in out.splitlines() if " - " in line)
        == 2
    )
    assert f"document 1: {lengths[1]} tokens" in out and texts[1][:40] in out


def test_build_index_reports_splits_and_epochs(dataset_prefix, capsys):
    overrides = [
        f"data.path=0.25 {dataset_prefix} 0.75 {dataset_prefix}",
        "data.seq_len=64",
        "model.vocab_size=512",
        "train.max_steps=100",
        "train.global_batch_size=8",
    ]
    assert build_index.main([*overrides, "--check-tokens"]) == 0
    out = capsys.readouterr().out
    dataset = IndexedDataset(dataset_prefix)
    assert f"{dataset.num_tokens:,} tokens" in out and "every token < 512" in out
    assert "the run reads 800 samples" in out and "25.0%" in out and "75.0%" in out


def test_build_index_fails_clearly_on_bad_data(tmp_path, dataset_prefix, capsys):
    assert (
        build_index.main([f"data.path={dataset_prefix}", "model.vocab_size=100", "--check-tokens"])
        == 2
    )
    assert "not below model.vocab_size = 100" in capsys.readouterr().err
    prefix = write(tmp_path / "x", [[1, 2, 3], [4, 5], [6]])
    raw = bytearray(open(f"{prefix}.idx", "rb").read())
    second_pointer = HEADER_SIZE + 3 * 4 + 8
    raw[second_pointer : second_pointer + 8] = np.int64(99).tobytes()  # not where #0 ends
    open(f"{prefix}.idx", "wb").write(raw)
    with pytest.raises(IndexedDatasetError, match="sequence 1 starts at byte 99"):
        IndexedDataset(prefix).validate()
    assert build_index.main([f"data.path={prefix}"]) == 2
    assert "pointers must be cumulative" in capsys.readouterr().err


def test_train_tokenizer_on_documents_that_are_one_long_line(tmp_path, documents, capsys):
    """Scraped text often has no newlines: every document one line of 20-200 KB, which
    sentencepiece would skip whole (its limit is 4,192 bytes) and then find no text."""
    text = " ".join(d.replace("\n", " ") for d in documents)
    rng = np.random.default_rng(0)
    sizes = rng.integers(20_000, 200_000, size=len(text) // 20_000)
    starts = np.concatenate(([0], np.cumsum(sizes)))
    docs = [text[a:b] for a, b in zip(starts[:-1], starts[1:]) if a < len(text)]
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model = tmp_path / "tok.model"
    args = [str(corpus), "--model", str(model), "--vocab-size", "8000"]
    assert train_tokenizer.main(args) == 0, capsys.readouterr().err
    tokenizer = Tokenizer(model)
    assert tokenizer.vocab_size == 8000
    assert all(tokenizer.decode(tokenizer.encode(d)) == d for d in docs[:3])
    assert len(tokenizer.encode(docs[0])) < len(docs[0].encode()) / 2  # it learned words


def test_train_tokenizer_says_how_little_text_it_had(tmp_path, capsys):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"text": "A short document. " * 300}) + "\n")
    args = [str(corpus), "--model", str(tmp_path / "t.model"), "--vocab-size", "8000"]
    assert train_tokenizer.main(args) == 2
    err = capsys.readouterr().err
    assert "could not train a model of 8,000 pieces" in err
    assert "1 non-empty lines (5,399 bytes) from 1 texts" in err  # stripped
    assert "1 of them longer than 4,192 bytes and cut into 2 pieces" in err
    assert not (tmp_path / "t.model").exists()


def test_train_tokenizer_from_jsonl_samples_bounded_lines(tmp_path, documents, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents) + "{bad\n")
    model = tmp_path / "t.model"
    args = [
        str(path),
        "--model",
        str(model),
        "--vocab-size",
        "600",
        "--text-field",
        "body",
        "--model-type",
        "unigram",
        "--special-tokens",
        "<sep>",
        "--sample-lines",
        "500",
    ]
    assert train_tokenizer.main(args) == 0
    tok = Tokenizer(model)
    assert tok.vocab_size == 600 and tok.piece_to_id("<sep>") == 4
    assert f"{len(documents):,} documents" in capsys.readouterr().out


def test_dedup_index_is_exact_across_memory_and_disk_runs(tmp_path):
    rng = np.random.default_rng(0)
    pool = np.frombuffer(rng.bytes(16 * 3000), dtype=HASH_DTYPE)
    index = DedupIndex(tmp_path / "d", memory_entries=64, merge_chunk=50)  # many runs and merges
    seen = set()
    for _ in range(60):
        batch = pool[rng.integers(0, len(pool), 100)]
        fresh = index.add_new(batch)
        expected = []
        for h in batch.tolist():
            expected.append(h not in seen)
            seen.add(h)
        assert fresh.tolist() == expected
    assert index.size == len(seen)
    assert len(index._runs) < 10 and len(list((tmp_path / "d").iterdir())) == len(index._runs)
    index.close()


@pytest.mark.parametrize(
    "text, options, reason, cleaned",
    [
        ("Cafe\u0301", CleaningOptions(), Reason.OK, "Caf\u00e9"),
        ("Cafe\u0301", CleaningOptions(normalize=False), Reason.OK, "Cafe\u0301"),
        ("a\x00b\x1bc\ufffd\td", CleaningOptions(), Reason.OK, "abc\td"),
        (
            "<p>Hi <a href='x'>there</a></p><script>x()</script>",
            CleaningOptions(),
            Reason.OK,
            "Hi there",
        ),
        (
            "std::vector<int> v; if (a<b && c>d)",
            CleaningOptions(),
            Reason.OK,
            "std::vector<int> v; if (a<b && c>d)",
        ),
        ("<br/>", CleaningOptions(), Reason.EMPTY, ""),
        ("short", CleaningOptions(min_chars=10), Reason.TOO_SHORT, "short"),
        ("long" * 10, CleaningOptions(max_chars=20), Reason.TOO_LONG, None),
        ("12 34 56 78 ab", CleaningOptions(min_alpha_fraction=0.5), Reason.LOW_ALPHA, None),
        ("naïve ÿ text", CleaningOptions(min_alpha_fraction=0.9), Reason.OK, "naïve ÿ text"),
        (
            "x\nx\nx\ny",
            CleaningOptions(max_repeated_line_fraction=0.3),
            Reason.REPEATED_LINES,
            None,
        ),
        ("bad \ud800", CleaningOptions(), Reason.INVALID_UTF8, None),
    ],
)
def test_cleaning_steps(text, options, reason, cleaned):
    result, data, got = clean(text, options)
    assert got == reason
    if cleaned is not None:
        assert result == cleaned
    if got == Reason.OK:
        assert data == result.encode()


def test_fast_control_character_check_agrees_with_the_regex():
    from data_tools.cleaning import _CONTROL, _has_control

    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in [*range(0x250), 0xFFFD, 0xFEFF, 0x2028, 0xD800, 0x1F600]]
    for _ in range(20_000):
        text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), rng.integers(0, 6)))
        assert _has_control(text) == bool(_CONTROL.search(text)), repr(text)
