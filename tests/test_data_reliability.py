"""Nothing silently wrong in the data tools and data loading (issue 16): each case as a
new user meets it, and what megagpt does instead. Also the cases that need a small or
read-only file system, made as a tmpfs mount (root, as under CI)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_tools import inspect, merge
from data_tools.preprocess import main as preprocess
from megagpt.checkpoint import CheckpointError
from megagpt.config import ConfigError, apply_overrides, load_config
from megagpt.data import IndexedDataset, IndexedDatasetError, build_datasets
from megagpt.data.indexed import HEADER_SIZE
from megagpt.tokenizer import Tokenizer
from megagpt.training.trainer import train
from megagpt.utils.run_lock import RunLock
from tests.conftest import TEST_VOCAB
from tests.test_data_tools import write
from tests.test_preprocess import write_jsonl


def preprocessed(tmp_path, texts, tokenizer, prefix, *extra) -> tuple[int, str]:
    corpus = write_jsonl(tmp_path / f"{Path(prefix).name}.jsonl", texts)
    args = [str(corpus), "--tokenizer", str(tokenizer), "--workers", "1"]
    return preprocess([*args, "--output-prefix", str(prefix), *extra]), f"{prefix}_00000"


# ---------------------------------------------------------------- 3. one job per prefix
def test_a_second_preprocess_into_the_same_prefix_is_refused(
    tmp_path, documents, tokenizer, capsys
):
    prefix = tmp_path / "out" / "corpus"
    prefix.parent.mkdir()
    with RunLock(f"{prefix}.lock", "megagpt-preprocess", "choose another --output-prefix"):
        code, _ = preprocessed(tmp_path, documents[:20], tokenizer.path, prefix)
        assert code == 2
        err = capsys.readouterr().err
        assert f"in use by another megagpt-preprocess: pid {os.getpid()}" in err
        assert "Traceback" not in err
        assert not Path(f"{prefix}.state").exists()  # the refused job wrote nothing
    assert preprocessed(tmp_path, documents[:20], tokenizer.path, prefix)[0] == 0


# ---------------------------------------------------------------- 5. merge
def test_merge_counts_a_shard_named_three_ways_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "x", [[1, 2, 3]] * 7)
    assert merge.main(["x", "./x", "x//", "--output-prefix", "all"]) == 0
    assert IndexedDataset(tmp_path / "all").num_documents == 7


def test_merge_refuses_shards_of_different_tokenizers(tmp_path, documents, tokenizer, capsys):
    other = Tokenizer.train(documents[::3], tmp_path / "other.model", vocab_size=TEST_VOCAB)
    code_a, a = preprocessed(tmp_path, documents[:30], tokenizer.path, tmp_path / "a")
    code_b, b = preprocessed(tmp_path, documents[30:60], other.path, tmp_path / "b")
    assert code_a == code_b == 0
    assert merge.main([a, b, "--output-prefix", str(tmp_path / "ab")]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and str(tokenizer.path) in err and str(other.path) in err
    assert not list(tmp_path.glob("ab.*"))
    assert merge.main([a, f"{tmp_path}/a_00000", "--output-prefix", str(tmp_path / "aa")]) == 0


def test_a_manifest_that_is_not_one_is_a_one_line_error(tmp_path, capsys):
    manifest = tmp_path / "m.json"
    manifest.write_text("{not json")
    assert merge.main(["--manifest", str(manifest), "--output-prefix", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--manifest {manifest} is not a megagpt-preprocess manifest" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 6. checks at open
def corrupt_a_middle_size(prefix: str) -> None:
    raw = bytearray(open(f"{prefix}.idx", "rb").read())
    raw[HEADER_SIZE + 4 * 2 : HEADER_SIZE + 4 * 3] = np.int32(2).tobytes()  # sequence 2
    open(f"{prefix}.idx", "wb").write(raw)


def test_a_damaged_index_fails_at_open_in_inspect_and_training(tmp_path, capsys, tiny_config):
    prefix = write(tmp_path / "d", [list(range(1, 40))] * 6)
    corrupt_a_middle_size(prefix)
    assert inspect.main([prefix]) == 2
    assert "sequence 3 starts at byte" in capsys.readouterr().err
    config = apply_overrides(tiny_config, [f"data.path={prefix}"], "test")
    with pytest.raises(IndexedDatasetError, match="pointers must be cumulative"):
        build_datasets(config.data, config.train.seed)
    with pytest.raises(IndexedDatasetError, match=f"{prefix}.idx"):
        train(config)


@pytest.mark.parametrize("kind", ["random bytes", "a jsonl file"])
def test_a_tokenizer_that_is_not_one_fails_before_anything_is_written(
    tmp_path, documents, tokenizer, capsys, kind
):
    fake = tmp_path / "fake.model"
    fake.write_bytes(os.urandom(4096) if kind == "random bytes" else b'{"text": "hi"}\n')
    prefix = tmp_path / "out" / "corpus"
    code, _ = preprocessed(tmp_path, documents[:20], fake, prefix)
    err = capsys.readouterr().err
    assert code == 2 and f"{fake} is not a sentencepiece model" in err
    assert "Traceback" not in err
    assert not Path(f"{prefix}.state").exists()
    assert preprocessed(tmp_path, documents[:20], tokenizer.path, prefix)[0] == 0  # no --overwrite


# ---------------------------------------------------------------- 7. output paths
def test_a_file_in_the_way_of_the_output_prefix(tmp_path, documents, tokenizer, capsys):
    (tmp_path / "out").write_text("a file, not a directory")
    code, _ = preprocessed(tmp_path, documents[:5], tokenizer.path, tmp_path / "out" / "corpus")
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'out'}" in err and "Traceback" not in err
    assert (tmp_path / "out").read_text() == "a file, not a directory"


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at `path`; skipped where mounting is not allowed (not root), but
    CI runs as root, and there a failed mount fails the test."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the full-disk tests: {reason}")
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_during_a_save_names_it_and_keeps_the_previous_checkpoint(
    tiny_config, tmp_path
):
    reference = train(apply_overrides(tiny_config, [f"train.output_dir={tmp_path / 'ref'}"], "t"))
    size = sum(f.stat().st_size for f in reference.checkpoint.rglob("*") if f.is_file())
    with tmpfs(tmp_path / "small", f"{int(size * 1.6) // 1024}k") as small:
        config = apply_overrides(
            tiny_config,
            [
                f"train.output_dir={tmp_path / 'run'}",
                f"checkpoint.dir={small}",
                "checkpoint.interval=2",
                "checkpoint.keep_last=2",
            ],
            "test",
        )
        with pytest.raises(CheckpointError) as error:
            train(config)
        message = str(error.value)
        assert f"no space left on tmpfs (mounted at {small}) while saving step 4" in message
        assert f"the previous checkpoint {small / 'step_00000002'} is intact" in message
        assert len(message.splitlines()) == 1
        assert sorted(p.name for p in small.iterdir()) == [
            ".megagpt.lock",
            "latest",
            "step_00000002",
        ]
        resumed = load_config(tmp_path / "run" / "config.yaml")
        assert resumed.checkpoint.dir == str(small)


def test_read_only_outputs_are_one_line_errors(tiny_config, tmp_path, documents, tokenizer, capsys):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        with pytest.raises(ConfigError, match=f"train.output_dir = {read_only / 'run'}: cannot"):
            train(apply_overrides(tiny_config, [f"train.output_dir={read_only / 'run'}"], "t"))
        code, _ = preprocessed(tmp_path, documents[:5], tokenizer.path, read_only / "corpus")
        err = capsys.readouterr().err
        assert code == 2 and str(read_only) in err and "Traceback" not in err
