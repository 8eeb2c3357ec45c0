"""A killed megagpt-preprocess, restarted with the same command, finishes with the
same bytes as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megagpt.data.manifest import read_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    """Ten jsonl files with some documents repeated across them (dedup state matters)."""
    directory = tmp_path_factory.mktemp("corpus")
    texts = list(dict.fromkeys(documents))
    for k in range(10):
        with open(directory / f"part{k}.jsonl", "w", encoding="utf-8") as f:
            for i, text in enumerate(texts[k * 60 : (k + 1) * 60 + 10]):
                f.write(json.dumps({"text": f"{text} ({i % 7})"}) + "\n")
            f.write("broken line\n")
    return sorted(directory.glob("*.jsonl"))


def command(inputs, tokenizer, prefix, *extra):
    return [
        sys.executable, "-m", "data_tools.preprocess", *map(str, inputs),
        "--tokenizer", str(tokenizer.path), "--output-prefix", str(prefix), "--workers", "2",
        "--batch-mb", "0.01", *extra,
    ]  # fmt: skip


def outputs(prefix):
    """Every shard's bytes, and the summary without this run's timings."""
    files = {}
    for shard in (s.prefix for s in read_manifest(f"{prefix}.manifest.json")):
        for ext in (".bin", ".idx"):
            files[os.path.basename(shard) + ext] = open(shard + ext, "rb").read()
    summary = json.loads(open(f"{prefix}.summary.json").read())
    for key in ("this_run", "resumed_after_shards", "manifest"):
        summary.pop(key)
    return files, summary


@pytest.mark.parametrize("extra", [(), ("--shard-tokens", "4000")], ids=["per-file", "per-tokens"])
def test_killed_and_restarted_run_equals_an_uninterrupted_one(tmp_path, corpus, tokenizer, extra):
    subprocess.run(
        command(corpus, tokenizer, tmp_path / "whole/c", *extra), check=True, capture_output=True
    )
    expected = outputs(tmp_path / "whole/c")
    assert len(expected[0]) >= 2 * 5

    prefix = tmp_path / "killed/c"
    process = subprocess.Popen(command(corpus, tokenizer, prefix, *extra), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    markers = tmp_path / "killed/c.state"
    deadline = time.monotonic() + 120
    while not (markers / "shard_00002.done").exists():  # kill it after a few shards
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the whole tree, like a preempted job
    process.wait()
    finished = len(list(markers.glob("*.done")))
    assert not (tmp_path / "killed/c.manifest.json").exists()
    assert finished < len(expected[0]) // 2  # really killed in the middle

    rerun = subprocess.run(
        command(corpus, tokenizer, prefix, *extra), capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed after {finished} shards" in rerun.stdout
    assert outputs(prefix) == expected
    assert not list((tmp_path / "killed").glob("*.partial"))
