"""Near-duplicate removal (MinHash + LSH) and preprocessing spread over tasks.

The corpus is paragraphs of Python's own documentation, chosen to be far from each
other, with planted copies at measured Jaccard similarities (word 5-gram shingles,
computed here by brute force as the reference).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from data_tools.minhash import MinHasher, MinHashSettings, settings_for_threshold
from data_tools.preprocess import main
from data_tools.tasks import JobLayout, split_files
from megagpt.data import IndexedDataset
from megagpt.data.manifest import read_manifest
from megagpt.utils.run_lock import RunLock

WORD = re.compile(rb"[0-9a-z\x80-\xff]+")


def shingles(text: str, n: int = 5) -> set:
    """The reference: word n-grams of the ASCII-lowercased UTF-8 text."""
    words = WORD.findall(text.encode("utf-8").lower())
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def edited(text: str, edits: int, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(edits):
        words[rng.randrange(len(words))] = f"zq{rng.randrange(10**9)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def originals(documents):
    """Paragraphs of 60 shingles or more, none within Jaccard 0.2 of another."""
    chosen, sets = [], []
    for text in dict.fromkeys(documents):
        if len(text) < 400:
            continue
        own = shingles(text)
        if len(own) >= 60 and all(len(own & s) / len(own | s) < 0.2 for s in sets):
            chosen.append(text)
            sets.append(own)
        if len(chosen) == 120:
            break
    return chosen


@pytest.fixture(scope="module")
def planted(originals):
    """(text, kind) in corpus order: every original, then after it sometimes a close
    copy (Jaccard >= 0.98: must go), a distant one (<= 0.3: must stay) or an exact one."""
    rng = random.Random(7)
    corpus = []
    for i, text in enumerate(originals):
        corpus.append((text, "original"))
        if i % 3 == 0:
            copy = f"{text} (edited)"  # one new shingle
            assert jaccard(text, copy) >= 0.98
            corpus.append((copy, "close"))
        elif i % 3 == 1:
            copy = edited(text, len(text.split(" ")) // 3, rng)
            assert jaccard(text, copy) <= 0.3
            corpus.append((copy, "distant"))
        if i % 5 == 0:
            corpus.append((text, "exact"))
    return corpus


def write_parts(directory, corpus, parts: int, dirty: bool = False):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(parts):
        path = directory / f"part{k}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for text, _ in corpus[k * len(corpus) // parts : (k + 1) * len(corpus) // parts]:
                f.write(json.dumps({"text": text}) + "\n")
            if dirty:
                f.write('\n{"text": 3}\n{"other": "x"}\nnot json\n')
        paths.append(path)
    return paths


def preprocess(inputs, tokenizer, prefix, *extra):
    args = [*map(str, inputs), "--tokenizer", str(tokenizer.path), "--output-prefix", str(prefix)]
    return main([*args, "--workers", "1", *extra])


def job_outputs(prefix):
    """The documents of the manifest's shards, in order, and the summary's counts."""
    documents = [
        IndexedDataset(shard.prefix)[i].tolist()
        for shard in read_manifest(f"{prefix}.manifest.json")
        for i in range(IndexedDataset(shard.prefix).num_documents)
    ]
    summary = json.loads(open(f"{prefix}.summary.json").read())
    counts = {k: summary[k] for k in ("documents_in", "documents_out", "tokens", "drops")}
    return documents, counts


def run_tasks(inputs, tokenizer, prefix, tasks: int, *extra):
    common = ["--num-tasks", str(tasks), *extra]
    for phase in ("scan", "dedup", "tokenize"):
        indices = [0] if phase == "dedup" else range(tasks)
        for index in indices:
            code = preprocess(inputs, tokenizer, prefix, *common, "--phase", phase,
                              "--task-index", str(index))  # fmt: skip
            assert code == 0, (phase, index)


# ------------------------------------------------------------------------- MinHash
def test_minhash_estimates_jaccard_without_bias(originals):
    rng = random.Random(3)
    pairs = [
        (t, edited(t, rng.randrange(1, max(2, len(t.split(" ")) // 4)), rng)) for t in originals
    ]
    documents = [d.encode() for pair in pairs for d in pair]
    hashes = np.array([hashlib.blake2b(d, digest_size=16).digest() for d in documents], "S16")
    signatures = MinHasher(MinHashSettings()).signatures(documents, hashes)
    errors = np.array(
        [
            (signatures[2 * i] == signatures[2 * i + 1]).mean() - jaccard(a, b)
            for i, (a, b) in enumerate(pairs)
        ]
    )
    assert abs(errors.mean()) < 0.015  # unbiased: the mean of 120 estimates
    assert np.abs(errors).max() < 5 * np.sqrt(0.25 / 112)  # each within 5 sigma


def test_words_ignore_case_punctuation_and_spacing_and_wordless_texts_stay_apart():
    hasher = MinHasher(MinHashSettings(bands=4, rows=2, shingle_words=3))
    texts = [b"The quick, brown fox!  Jumps.", b"the QUICK brown fox jumps", b"!!!", b"???"]
    hashes = np.array([hashlib.blake2b(t, digest_size=16).digest() for t in texts], "S16")
    keys = hasher.band_keys(texts, hashes)
    assert (keys[0] == keys[1]).all()
    assert not (keys[2] == keys[3]).any()  # no words: only an identical text matches
    short = hasher.band_keys([b"two words", b"two words"], hashes[:2])  # fewer than 3
    assert (short[0] == short[1]).all()


def test_threshold_chooses_bands_and_rows():
    default = MinHashSettings()
    assert (default.bands, default.rows) == (14, 8)
    assert default.threshold == pytest.approx(0.719, abs=1e-3)
    assert default.catch_probability(0.8) == pytest.approx(0.92, abs=0.01)
    for threshold in (0.5, 0.72, 0.9):
        chosen = settings_for_threshold(threshold)
        assert chosen.num_hashes <= 112
        assert abs(chosen.threshold - threshold) < 0.02


def test_files_are_split_into_contiguous_byte_balanced_ranges():
    sizes = [5, 1, 1, 1, 8, 2, 2, 4]
    ranges = split_files(sizes, 3)
    assert [i for r in ranges for i in r] == list(range(len(sizes)))
    assert [sum(sizes[i] for i in r) for r in ranges] == [8, 8, 8]
    assert split_files([10], 4) == [range(0, 0), range(0, 0), range(0, 1), range(1, 1)]


# ----------------------------------------------------------------- preprocessing
def test_near_duplicates_are_removed_and_distant_copies_kept(tmp_path, planted, tokenizer):
    inputs = write_parts(tmp_path / "in", planted, 4)
    assert preprocess(inputs, tokenizer, tmp_path / "out/c", "--near-dedup") == 0
    documents, counts = job_outputs(tmp_path / "out/c")
    kinds = [kind for _, kind in planted]
    expected = [
        [*ids, tokenizer.eod_id]
        for (_, kind), ids in zip(planted, tokenizer.encode_batch([t for t, _ in planted]))
        if kind in ("original", "distant")
    ]
    assert documents == expected  # in input order: every close copy and exact one gone
    assert counts["drops"] == {
        "duplicate": kinds.count("exact"),
        "near_duplicate": kinds.count("close"),
    }
    summary = json.loads((tmp_path / "out/c.summary.json").read_text())
    assert summary["deduplication"]["near"]["bands"] == 14


@pytest.mark.parametrize("extra", [(), ("--shard-tokens", "5000")], ids=["per-file", "tokens"])
def test_four_tasks_write_what_one_process_writes(tmp_path, planted, tokenizer, extra):
    inputs = write_parts(tmp_path / "in", planted, 6)
    near = ("--near-dedup", "--dedup-partitions", "4", *extra)
    assert preprocess(inputs, tokenizer, tmp_path / "one/c", *near) == 0
    run_tasks(inputs, tokenizer, tmp_path / "four/c", 4, *near)
    assert job_outputs(tmp_path / "four/c") == job_outputs(tmp_path / "one/c")
    shards = [s.prefix for s in read_manifest(tmp_path / "four/c.manifest.json")]
    assert {os.path.basename(p)[: len("c_task00000")] for p in shards} == {
        f"c_task{i:05d}" for i in range(4)
    }


def test_exact_dedup_over_tasks_equals_the_streaming_run(tmp_path, planted, tokenizer):
    inputs = write_parts(tmp_path / "in", planted, 5)
    assert preprocess(inputs, tokenizer, tmp_path / "one/c") == 0  # one pass, streaming
    run_tasks(inputs, tokenizer, tmp_path / "three/c", 3)
    one, three = job_outputs(tmp_path / "one/c"), job_outputs(tmp_path / "three/c")
    assert three == one and one[1]["drops"] == {"duplicate": 24}


def test_dirty_input_is_counted_and_never_fatal_with_near_dedup(tmp_path, planted, tokenizer):
    inputs = write_parts(tmp_path / "in", planted[:40], 2, dirty=True)
    (tmp_path / "in/bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n\n')
    inputs.append(tmp_path / "in/bad.jsonl")
    run_tasks(inputs, tokenizer, tmp_path / "out/c", 2, "--near-dedup")
    drops = job_outputs(tmp_path / "out/c")[1]["drops"]
    assert drops["empty_line"] == 3 and drops["wrong_type"] == 2
    assert drops["missing_field"] == 2 and drops["invalid_json"] == 2
    assert drops["invalid_utf8"] == 1


def test_phases_out_of_order_and_mixed_settings_are_clear_errors(
    tmp_path, planted, tokenizer, capsys
):
    inputs = write_parts(tmp_path / "in", planted[:30], 2)
    prefix = tmp_path / "out/c"
    tasks = ["--num-tasks", "2", "--near-dedup"]
    assert preprocess(inputs, tokenizer, prefix, *tasks) == 2
    assert "give --phase" in capsys.readouterr().err
    assert (
        preprocess(inputs, tokenizer, prefix, *tasks, "--phase", "scan", "--task-index", "0") == 0
    )
    assert (
        preprocess(inputs, tokenizer, prefix, *tasks, "--phase", "dedup", "--task-index", "0") == 2
    )
    assert "not finished for task(s) 1 of 2" in capsys.readouterr().err
    assert (
        preprocess(inputs, tokenizer, prefix, *tasks, "--phase", "tokenize", "--task-index", "1")
        == 2
    )
    assert "run `--phase dedup` first" in capsys.readouterr().err
    other = ["--num-tasks", "2", "--near-dedup", "--shingle-words", "3"]
    assert (
        preprocess(inputs, tokenizer, prefix, *other, "--phase", "scan", "--task-index", "1") == 2
    )
    assert "holds a job started with different near_dedup" in capsys.readouterr().err
    overwrite = [*tasks, "--phase", "scan", "--task-index", "1", "--overwrite"]
    assert preprocess(inputs, tokenizer, prefix, *overwrite) == 2
    assert "delete the others' work" in capsys.readouterr().err
    assert preprocess(inputs, tokenizer, prefix, *tasks, "--phase", "scan") == 2
    assert "give --task-index" in capsys.readouterr().err
    assert preprocess(inputs, tokenizer, prefix, "--minhash-bands", "4") == 2
    assert "needs --near-dedup" in capsys.readouterr().err


def scan_command(inputs, tokenizer, prefix):
    return [
        sys.executable, "-m", "data_tools.preprocess", *map(str, inputs), "--tokenizer",
        str(tokenizer.path), "--output-prefix", str(prefix), "--workers", "1", "--batch-mb",
        "0.002", "--near-dedup", "--num-tasks", "1", "--phase", "scan", "--dedup-partitions", "4",
    ]  # fmt: skip


def scan_files(prefix):
    directory = JobLayout(str(prefix), 1).scan_directory(0)
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.keys"))}


def test_a_killed_scan_resumes_to_the_same_bytes(tmp_path, planted, tokenizer):
    inputs = write_parts(tmp_path / "in", planted * 3, 8)
    subprocess.run(scan_command(inputs, tokenizer, tmp_path / "whole/c"), check=True,
                   capture_output=True)  # fmt: skip
    expected = scan_files(tmp_path / "whole/c")
    prefix = tmp_path / "killed/c"
    process = subprocess.Popen(scan_command(inputs, tokenizer, prefix), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = JobLayout(str(prefix), 1).scan_marker(0, 1)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)  # into the next file: its keys are partly written
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not JobLayout(str(prefix), 1).scan_done(0).exists()
    rerun = subprocess.run(scan_command(inputs, tokenizer, prefix), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming the scan after" in rerun.stderr
    assert scan_files(prefix) == expected


def test_a_restarted_dedup_phase_redoes_only_unfinished_partitions(
    tmp_path, planted, tokenizer, caplog
):
    caplog.set_level(logging.INFO)
    inputs = write_parts(tmp_path / "in", planted, 3)
    prefix = tmp_path / "out/c"
    common = ["--near-dedup", "--num-tasks", "1", "--dedup-partitions", "4"]
    assert preprocess(inputs, tokenizer, prefix, *common, "--phase", "scan") == 0
    assert preprocess(inputs, tokenizer, prefix, *common, "--phase", "dedup") == 0
    layout = JobLayout(str(prefix), 1)
    marks = {kind: layout.marks_path(kind).read_bytes() for kind in ("exact", "near")}
    done = json.loads(layout.dedup_done.read_text())
    layout.dedup_done.unlink()  # as if killed before any near partition was done
    layout.marks_path("near").write_bytes(bytes(len(marks["near"])))
    for partition in range(4):
        layout.partition_marker("near", partition).unlink()
    assert preprocess(inputs, tokenizer, prefix, *common, "--phase", "dedup") == 0
    assert "resuming with 4 of 8 partitions left" in caplog.text
    assert {kind: layout.marks_path(kind).read_bytes() for kind in marks} == marks
    again = json.loads(layout.dedup_done.read_text())
    assert {k: again[k] for k in done if k != "seconds"} == {
        k: done[k] for k in done if k != "seconds"
    }


def test_tasks_without_files_write_nothing_and_the_job_completes(tmp_path, planted, tokenizer):
    inputs = write_parts(tmp_path / "in", planted, 2)  # 2 files for 3 tasks: one gets none
    assert preprocess(inputs, tokenizer, tmp_path / "one/c", "--near-dedup") == 0
    run_tasks(inputs, tokenizer, tmp_path / "three/c", 3, "--near-dedup")
    assert job_outputs(tmp_path / "three/c") == job_outputs(tmp_path / "one/c")
    manifests = [read_manifest(tmp_path / f"three/c_task{i:05d}.manifest.json") for i in range(3)]
    assert sorted(len(m) for m in manifests) == [0, 1, 1]


def test_tasks_finishing_together_take_turns_writing_the_job(tmp_path, planted, tokenizer):
    inputs = write_parts(tmp_path / "in", planted, 4)
    assert preprocess(inputs, tokenizer, tmp_path / "one/c", "--near-dedup") == 0
    prefix, near = tmp_path / "two/c", ("--near-dedup", "--num-tasks", "2")
    for phase, index in (("scan", 0), ("scan", 1), ("dedup", 0), ("tokenize", 0)):
        args = ("--phase", phase, "--task-index", str(index))
        assert preprocess(inputs, tokenizer, prefix, *near, *args) == 0
    # Task 0 is still writing the job's manifest when task 1 finishes (under SLURM: the
    # array task failed with "in use by another job completion").
    other = RunLock(tmp_path / "two/c.job/finish.lock", "job completion", "")
    threading.Timer(1.0, other.acquire().release).start()
    args = ("--phase", "tokenize", "--task-index", "1")
    assert preprocess(inputs, tokenizer, prefix, *near, *args) == 0
    assert job_outputs(prefix) == job_outputs(tmp_path / "one/c")


def tokenize_command(inputs, tokenizer, prefix, task):
    return [
        sys.executable, "-m", "data_tools.preprocess", *map(str, inputs), "--tokenizer",
        str(tokenizer.path), "--output-prefix", str(prefix), "--workers", "1", "--batch-mb",
        "0.002", "--near-dedup", "--num-tasks", "2", "--phase", "tokenize", "--task-index",
        str(task), "--shard-tokens", "3000",
    ]  # fmt: skip


def test_a_killed_tokenize_task_resumes_to_the_same_bytes(tmp_path, planted, tokenizer):
    inputs = write_parts(tmp_path / "in", planted * 2, 4)
    near = ("--near-dedup", "--shard-tokens", "3000")
    run_tasks(inputs, tokenizer, tmp_path / "whole/c", 2, *near)
    prefix = tmp_path / "killed/c"
    for phase, index in (("scan", 0), ("scan", 1), ("dedup", 0)):
        assert preprocess(inputs, tokenizer, prefix, "--num-tasks", "2", *near, "--phase", phase,
                          "--task-index", str(index)) == 0  # fmt: skip
    process = subprocess.Popen(tokenize_command(inputs, tokenizer, prefix, 0),
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    marker = tmp_path / "killed/c_task00000.state/shard_00001.done"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    reruns = [
        subprocess.run(tokenize_command(inputs, tokenizer, prefix, task), capture_output=True,
                       text=True)
        for task in (0, 1)
    ]  # fmt: skip
    assert [r.returncode for r in reruns] == [0, 0], reruns[0].stderr + reruns[1].stderr
    assert re.search(r"resumed after [1-9]\d* shards", reruns[0].stdout)
    assert "job complete: 2 tasks" in reruns[1].stdout
    assert job_outputs(prefix) == job_outputs(tmp_path / "whole/c")
    for shard in read_manifest(tmp_path / "whole/c.manifest.json"):
        other = str(shard.prefix).replace("/whole/", "/killed/")
        for ext in (".bin", ".idx"):
            assert open(shard.prefix + ext, "rb").read() == open(other + ext, "rb").read()
