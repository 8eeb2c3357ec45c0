"""Nothing silently wrong in training and checkpoints: each case of the reliability
issue (16), reproduced as a new user would meet it, and what megagpt does instead."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megagpt.checkpoint import CheckpointError, load_model_for_inference, verify_checkpoints
from megagpt.checkpoint.convert import export_hf
from megagpt.config import ConfigError, apply_overrides, load_config
from megagpt.generate import generate_text
from megagpt.testing import run_distributed
from megagpt.tokenizer import Tokenizer
from megagpt.training.outputs import LOCK_FILE
from megagpt.training.trainer import train
from tests.conftest import TEST_VOCAB, tiny_overrides
from tests.test_cli import megagpt


def run_in(tiny_config, out, *extra):
    return apply_overrides(
        tiny_config,
        [f"train.output_dir={out}", "train.eval_interval=0", "logging.tensorboard=false", *extra],
        "test",
    )


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").glob("step_*"))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def a_shard(checkpoint: Path) -> Path:
    return max((checkpoint / "state").glob("*.distcp"), key=lambda p: p.stat().st_size)


# ---------------------------------------------------------------- 1. model fit
def test_a_model_that_differs_from_the_checkpoint_does_not_resume(tiny_config, tmp_path):
    out = tmp_path / "run"
    train(run_in(tiny_config, out, "checkpoint.interval=3"))
    config_before = (out / "config.yaml").read_text()
    smaller = run_in(tiny_config, out, "model.n_layers=1", "checkpoint.resume=auto")
    with pytest.raises(CheckpointError, match="unexpected layers.1.attn") as error:
        train(apply_overrides(smaller, ["train.max_steps=8"], "test"))
    assert "checkpoint.partial_load=true" in str(error.value)
    bigger = run_in(tiny_config, out, "model.n_layers=3", "checkpoint.resume=auto")
    with pytest.raises(CheckpointError, match="missing layers.2.attn"):
        train(apply_overrides(bigger, ["train.max_steps=8"], "test"))
    # refused runs change nothing: same checkpoints, the run's own config.yaml
    assert checkpoints(out) == ["step_00000003", "step_00000006"]
    assert (out / "config.yaml").read_text() == config_before
    partial = apply_overrides(smaller, ["train.max_steps=8", "checkpoint.partial_load=true"], "t")
    result = train(partial)
    assert result.start_step == 6 and len(result.losses) == 2


# ---------------------------------------------------------------- 2. tokenizer
def test_resuming_with_another_tokenizer_is_refused(tiny_config, documents, tmp_path):
    out = tmp_path / "run"
    train(run_in(tiny_config, out))
    other = Tokenizer.train(documents[::3], tmp_path / "other.model", vocab_size=TEST_VOCAB)
    config = run_in(tiny_config, out, f"data.tokenizer={other.path}", "checkpoint.resume=auto")
    with pytest.raises(CheckpointError) as error:
        train(apply_overrides(config, ["train.max_steps=8"], "test"))
    message = str(error.value)
    assert str(other.path) in message
    assert str(out / "checkpoints" / "step_00000006" / "tokenizer.model") in message
    same = run_in(tiny_config, out, "checkpoint.resume=auto", "train.max_steps=8")
    assert train(same).start_step == 6  # the tokenizer it was trained with resumes


# ---------------------------------------------------------------- 3. one run per directory
def test_a_second_run_into_the_same_directory_is_refused(dataset_prefix, tokenizer, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(dataset_prefix, tokenizer, out) + [
        "train.max_steps=40",
        "train.eval_interval=0",
        "checkpoint.interval=2",
        "logging.tensorboard=false",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "megagpt", "train", *overrides, "train.seed=1"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = out / LOCK_FILE
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()):  # the first run holds it
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = megagpt("train", *overrides, "train.seed=2")
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by another training run: pid {first.pid} on {socket.gethostname()}" in (
        second.stderr
    )
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # one run's records, once each
    assert load_config(out / "config.yaml").train.seed == 1
    assert not lock.read_text().strip()  # released: the next run starts quietly


def test_a_lock_left_by_a_dead_run_is_taken_over(tiny_config, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = {"host": socket.gethostname(), "pid": 999_999, "started": "yesterday"}
    (out / LOCK_FILE).write_text(json.dumps(dead))  # recorded, but nobody holds the flock
    with caplog.at_level("INFO"):
        train(run_in(tiny_config, out, "train.max_steps=2"))
    assert any(
        "took over the lock" in r.getMessage() and "999999" in r.getMessage()
        for r in caplog.records
    )


def test_ranks_stop_together_when_the_directory_is_taken(tiny_config, tmp_path):
    from megagpt.utils.run_lock import RunLock

    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out / LOCK_FILE, "training run", "choose another train.output_dir")
    with held, pytest.raises(RuntimeError, match="in use by another training run") as error:
        run_distributed(train, 2, args=(run_in(tiny_config, out),))
    assert f"pid {os.getpid()}" in str(error.value)


# ---------------------------------------------------------------- 4. checksums
@pytest.fixture
def two_checkpoints(tiny_config, tmp_path):
    out = tmp_path / "run"
    result = train(run_in(tiny_config, out, "checkpoint.interval=3"))
    return out, result


def test_checkpoints_record_the_checksum_of_every_file(two_checkpoints):
    out, _ = two_checkpoints
    metadata = json.loads((out / "checkpoints/step_00000006/metadata.json").read_text())
    names = set(metadata["checksums"])
    on_disk = {
        str(p.relative_to(out / "checkpoints/step_00000006"))
        for p in (out / "checkpoints/step_00000006").rglob("*")
        if p.is_file()
    }
    assert names == on_disk - {"metadata.json", "config.yaml"}
    assert [problems for _, problems in verify_checkpoints(out)] == [[], []]
    assert megagpt("checkpoint", "verify", str(out)).returncode == 0


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "deleted"])
def test_a_damaged_shard_is_detected_and_resume_falls_back(two_checkpoints, tmp_path, damage):
    out, _ = two_checkpoints
    newest = out / "checkpoints" / "step_00000006"
    shard = a_shard(newest)
    if damage == "flipped byte":
        flip_byte(shard, shard.stat().st_size // 2)
    elif damage == "truncated":
        os.truncate(shard, shard.stat().st_size // 3)
    else:
        shard.unlink()
    for use in (lambda: export_hf(out, tmp_path / "hf"), lambda: load_model_for_inference(out)):
        with pytest.raises(CheckpointError, match=f"{shard}: "):
            use()
    assert not (tmp_path / "hf").exists()
    verify = megagpt("checkpoint", "verify", str(out))
    assert verify.returncode == 2 and "step_00000006: DAMAGED" in verify.stdout
    assert str(shard) in verify.stdout and "step_00000003: ok" in verify.stdout
    config = load_config(out / "config.yaml")
    resumed = train(apply_overrides(config, ["checkpoint.resume=auto"], "test"))
    assert resumed.start_step == 3 and len(resumed.losses) == 3  # from the intact one


def test_a_multi_rank_checkpoint_verifies(tiny_config, tmp_path):
    out = tmp_path / "dp2"
    run_distributed(train, 2, args=(run_in(tiny_config, out, "parallel.zero_stage=1"),))
    ((checkpoint, problems),) = verify_checkpoints(out / "checkpoints" / "step_00000006")
    shards = json.loads((checkpoint / "metadata.json").read_text())["checksums"]
    assert problems == [] and sum(n.endswith(".distcp") for n in shards) >= 2


def test_a_truncated_metadata_file_is_one_line_and_auto_falls_back(two_checkpoints):
    out, _ = two_checkpoints
    metadata = out / "checkpoints" / "step_00000006" / "metadata.json"
    metadata.write_text(metadata.read_text()[:40])
    done = megagpt("generate", "--checkpoint", str(out), "--max-new-tokens", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{metadata} is not valid JSON" in done.stderr
    config = load_config(out / "config.yaml")
    assert train(apply_overrides(config, ["checkpoint.resume=auto"], "test")).start_step == 3


def test_latest_must_name_a_checkpoint_of_its_own_directory(two_checkpoints, tmp_path):
    out, _ = two_checkpoints
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "checkpoints" / "latest").write_text(f"../../{elsewhere.name}\n")
    config = load_config(out / "config.yaml")
    with pytest.raises(CheckpointError, match="not a checkpoint directory of"):
        train(apply_overrides(config, ["checkpoint.resume=auto"], "test"))


# ---------------------------------------------------------------- 7. clean failures
def test_a_file_in_the_way_of_the_output_directory(tiny_config, tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"train.output_dir = {blocker}: a file is in the way"):
        train(run_in(tiny_config, blocker))
    assert blocker.read_text() == "not a directory"


def test_ctrl_c_saves_a_checkpoint(dataset_prefix, tokenizer, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(dataset_prefix, tokenizer, out) + [
        "train.max_steps=100000",
        "train.eval_interval=0",
        "logging.tensorboard=false",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "megagpt", "train", *overrides],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in process.stdout:  # wait for training to be under way
        if "step 3/" in line:
            break
    process.send_signal(signal.SIGINT)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 130, log[-2000:]
    assert "interrupted (Ctrl-C): checkpoint saved" in log and "Traceback" not in log
    (checkpoint,) = checkpoints(out)
    assert json.loads((out / "checkpoints" / checkpoint / "metadata.json").read_text())["step"] > 3


# ---------------------------------------------------------------- 8. flags
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "-1", "--temperature -1.0: must be >= 0"),
        ("--top-p", "0", "--top-p 0.0: must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p 1.5: must be in (0, 1]"),
        ("--top-k", "-2", "--top-k -2: must be >= 0"),
        ("--max-new-tokens", "-5", "--max-new-tokens -5: must be >= 0"),
        ("--num-samples", "0", "--num-samples 0: must be at least 1"),
    ],
)
def test_generate_refuses_sampling_flags_out_of_range(capsys, flag, value, message):
    from megagpt.cli import main

    assert main(["generate", "--checkpoint", "unused", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_more_new_tokens_than_positions_left_says_it_was_cut(tokenizer, caplog):
    from megagpt.config import ModelConfig
    from megagpt.model import build_model

    model = build_model(ModelConfig(vocab_size=TEST_VOCAB, max_seq_len=16)).eval()
    (text,) = generate_text(model, tokenizer, "The", max_new_tokens=100, temperature=0)
    prompt_tokens = len(tokenizer.encode_prompt("The"))
    assert f"max_new_tokens = 100 cut to {16 - prompt_tokens}" in caplog.text
    assert len(tokenizer.encode(text)) <= 16


def test_an_override_typo_names_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key optim.lrr \(command line\)"):
        load_config(path, ["optim.lrr=1"])
    path.write_text("optim:\n  lrr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"unknown key optim.lrr \({path}\)"):
        load_config(path, ["optim.lr=1"])


# ---------------------------------------------------------------- 9. the demo's length
def test_the_demo_shortens_its_run_to_the_machine(tiny_config, tmp_path, monkeypatch, capsys):
    from megagpt import demo

    config = apply_overrides(
        tiny_config,
        ["train.max_steps=600", "optim.warmup_steps=50", "train.eval_interval=50"],
        "test",
    )
    monkeypatch.setattr(demo, "TRAIN_SECONDS", 1e-3)  # a very slow machine
    sized = demo.size_to_machine(tmp_path, config, 1, overrides=[])
    assert sized.train.max_steps == demo.MIN_STEPS == 60
    assert (sized.optim.warmup_steps, sized.train.eval_interval) == (5, 5)  # 50 x 60/600
    assert "60 of 600 steps" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # the calibration run leaves nothing
    monkeypatch.setattr(demo, "TRAIN_SECONDS", 1e9)  # a fast one runs them all
    assert demo.size_to_machine(tmp_path, config, 1, overrides=[]).train.max_steps == 600
    explicit = demo.size_to_machine(tmp_path, config, 1, overrides=["train.max_steps=600"])
    assert explicit is config
