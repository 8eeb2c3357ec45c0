"""megagpt-preprocess end to end: real files, real worker processes, real tokenizer."""

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools.preprocess import main
from megagpt.data import IndexedDataset
from megagpt.data.manifest import read_manifest


@pytest.fixture(scope="module")
def texts(documents):
    """Distinct documents (the help topics repeat some paragraphs)."""
    return list(dict.fromkeys(documents))


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def run(tmp_path, inputs, tokenizer, *extra, prefix="out/corpus"):
    args = [*map(str, inputs), "--tokenizer", str(tokenizer.path), "--workers", "2"]
    code = main([*args, "--output-prefix", str(tmp_path / prefix), *extra])
    summary_path = tmp_path / f"{prefix}.summary.json"
    return code, json.loads(summary_path.read_text()) if summary_path.exists() else None


def shard_documents(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def shard_prefixes(tmp_path, prefix="out/corpus"):
    return [shard.prefix for shard in read_manifest(tmp_path / f"{prefix}.manifest.json")]


def expected_tokens(tokenizer, texts):
    return [[*ids, tokenizer.eod_id] for ids in tokenizer.encode_batch(texts)]


def test_every_input_format_gives_the_tokens_of_its_documents(tmp_path, texts, tokenizer):
    texts = texts[:60]
    inputs = [
        write_jsonl(tmp_path / "a.jsonl", texts[:20]),
        write_jsonl(tmp_path / "b.jsonl.gz", texts[20:35], gzip.open),
        write_jsonl(tmp_path / "c.jsonl.zst", texts[35:50], zstandard.open),
    ]
    pq.write_table(
        pa.table({"text": texts[50:58], "id": list(range(8))}),
        tmp_path / "d.parquet",
        row_group_size=3,
    )
    inputs.append(tmp_path / "d.parquet")
    for k, text in enumerate(texts[58:]):
        (tmp_path / f"e{k}.txt").write_text(text, encoding="utf-8")
    code, summary = run(tmp_path, [*inputs, tmp_path / "e*.txt"], tokenizer)
    assert code == 0
    assert summary["documents_in"] == summary["documents_out"] == 60 and summary["drops"] == {}
    manifest = json.loads((tmp_path / "out/corpus.manifest.json").read_text())
    assert len(manifest["shards"]) == 6  # one per input file
    got = [doc for shard in shard_prefixes(tmp_path) for doc in shard_documents(shard)]
    assert got == expected_tokens(tokenizer, texts)
    assert summary["tokens"] == sum(map(len, got))


def test_shards_of_n_tokens(tmp_path, texts, tokenizer):
    texts = texts[:200]
    inputs = [write_jsonl(tmp_path / f"{k}.jsonl", texts[k::2]) for k in range(2)]
    code, summary = run(tmp_path, inputs, tokenizer, "--shard-tokens", "3000")
    assert code == 0
    prefixes = shard_prefixes(tmp_path)
    sizes = [IndexedDataset(p).num_tokens for p in prefixes]
    assert all(size >= 3000 for size in sizes[:-1]) and sizes[-1] > 0
    assert all(
        size - len(doc) < 3000
        for size, doc in zip(sizes, [s[-1] for s in map(shard_documents, prefixes)])
    )
    got = [doc for prefix in prefixes for doc in shard_documents(prefix)]
    assert got == expected_tokens(tokenizer, texts[0::2] + texts[1::2])


def test_exact_duplicates_are_removed_across_files(tmp_path, texts, tokenizer):
    first, second = texts[:30], texts[20:40] + texts[5:8]  # 13 of 23 seen before
    inputs = [
        write_jsonl(tmp_path / "1.jsonl", first + first[:2]),
        write_jsonl(tmp_path / "2.jsonl.gz", second, gzip.open),
    ]
    code, summary = run(tmp_path, inputs, tokenizer)
    assert code == 0
    assert summary["drops"] == {"duplicate": 2 + 13}
    got = [doc for k in range(2) for doc in shard_documents(tmp_path / f"out/corpus_{k:05d}")]
    assert got == expected_tokens(tokenizer, texts[:40])
    code, summary = run(tmp_path, inputs, tokenizer, "--no-dedup", "--overwrite")
    assert summary["documents_out"] == 32 + 23


DIRTY_RECORDS = [
    b"",  # empty line
    b'{"text": "unterminated',  # malformed JSON
    b'\xff\xfe{"text": "bad bytes \xc3\x28"}',  # invalid UTF-8
    bytes(b for b in range(256) if b != ord("\n")) * 4,  # binary junk
    b'{"title": "no text field"}',
    b'{"text": 42}',  # wrong type
    b'{"text": "lone surrogate \\ud800"}',
    b'["an", "array"]',
    b'{"text": "   \\u0000\\u0001  "}',  # nothing left after cleaning
]
"""jsonl lines of every kind of bad record but the oversized one (one of each)."""


def test_dirty_inputs_are_counted_and_never_fatal(tmp_path, texts, tokenizer):
    good = texts[:10]
    lines = [json.dumps({"text": t}).encode() for t in good]
    dirty = [
        lines[0],
        *DIRTY_RECORDS,
        lines[1],
        b'{"text": "' + b"x" * (50 << 20) + b'"}',  # a 50 MB document
        *lines[2:6],
    ]
    (tmp_path / "dirty.jsonl").write_bytes(b"\n".join(dirty) + b"\n")
    tail = [json.dumps({"text": t}).encode() for t in texts[6:300]]
    whole = gzip.compress(b"\n".join(tail) + b"\n")
    (tmp_path / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    code, summary = run(
        tmp_path, [tmp_path / "dirty.jsonl", tmp_path / "truncated.jsonl.gz"], tokenizer
    )
    assert code == 0
    assert summary["drops"] == {
        "empty_line": 1,
        "invalid_json": 2,  # the unterminated object and the array
        "invalid_utf8": 3,  # bad bytes, binary junk, lone surrogate
        "missing_field": 1,
        "wrong_type": 1,
        "empty": 1,
        "too_long": 1,
        "corrupt_file": 1,
    }
    kept = shard_documents(tmp_path / "out/corpus_00000")
    assert kept == expected_tokens(tokenizer, good[:6])
    recovered = shard_documents(tmp_path / "out/corpus_00001")  # what precedes the cut
    assert 50 < len(recovered) < 294
    assert recovered == expected_tokens(tokenizer, texts[6 : 6 + len(recovered)])
    assert summary["documents_in"] == summary["documents_out"] + sum(summary["drops"].values())


def test_strict_stops_at_the_first_bad_record_naming_file_and_line(
    tmp_path, texts, tokenizer, capsys
):
    path = write_jsonl(tmp_path / "x.jsonl", texts[:5])
    with open(path, "a") as f:
        f.write('{"text": 7}\n')
    code, _ = run(tmp_path, [path], tokenizer, "--strict")
    assert code == 2
    assert f"{path}:6: wrong_type: 'text' is a int" in capsys.readouterr().err
    assert not (tmp_path / "out/corpus_00000.bin").exists()


def test_cleaning_options_and_quality_filters(tmp_path, tokenizer):
    texts = [
        "Cafe\u0301 <b>bold</b> <!-- note --> vector<int> keeps\x07 going",
        "1234 5678 9012 3456 7890 ++++ ====",
        "same line\nsame line\nsame line\nother line",
    ]
    path = write_jsonl(tmp_path / "c.jsonl", texts)
    code, summary = run(
        tmp_path, [path], tokenizer, "--min-alpha-fraction", "0.5", "--max-repeated-lines", "0.4"
    )
    assert summary["drops"] == {"low_alpha": 1, "repeated_lines": 1}
    kept = shard_documents(tmp_path / "out/corpus_00000")
    assert kept == expected_tokens(tokenizer, ["Caf\u00e9 bold  vector<int> keeps going"])


def test_progress_lines_when_not_a_terminal(tmp_path, texts, tokenizer, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", texts[:50])
    with caplog.at_level(logging.INFO):
        run(tmp_path, [path], tokenizer, "--log-interval", "0")
    progress = [r.getMessage() for r in caplog.records if "docs/s" in r.getMessage()]
    assert progress and all("MB/s" in line and "ETA" in line for line in progress)


def test_a_changed_command_does_not_resume_someone_elses_run(tmp_path, texts, tokenizer, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", texts[:5])
    assert run(tmp_path, [path], tokenizer)[0] == 0
    assert run(tmp_path, [path], tokenizer, "--min-chars", "5")[0] == 2
    assert "different cleaning" in capsys.readouterr().err
    assert run(tmp_path, [path], tokenizer, "--min-chars", "5", "--overwrite")[0] == 0


@pytest.mark.parametrize(
    "pattern, message", [("missing.jsonl", "no such file"), ("x.csv", "unsupported format")]
)
def test_bad_input_paths_are_clear_errors(tmp_path, tokenizer, capsys, pattern, message):
    (tmp_path / "x.csv").write_text("a,b\n")
    code, _ = run(tmp_path, [tmp_path / pattern], tokenizer)
    assert code == 2 and message in capsys.readouterr().err
