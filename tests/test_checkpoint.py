"""Sharded checkpoints: format, crash safety, exact resume, resume on other layouts."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from megagpt.checkpoint import (
    CheckpointError,
    consolidated_state_dict,
    load_model_for_inference,
    read_metadata,
    resolve_checkpoint_dir,
)
from megagpt.checkpoint.checksums import checkpoint_problems, file_summary
from megagpt.checkpoint.layout import apply_retention, remove_incomplete
from megagpt.checkpoint.safe_dcp import SafeLoadPlanner
from megagpt.config import apply_overrides
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests.conftest import tiny_overrides

# A fixed decay length makes the learning rate of step s independent of max_steps, so
# "3 steps, then resume to 6" follows the same schedule as "6 steps".
SCHEDULE = [
    "optim.decay_steps=6",
    "train.eval_interval=0",
    "logging.tensorboard=false",
    "train.micro_batch_size=2",
    "model.n_layers=4",
]


def config_for(tiny_config, out, *extra):
    return apply_overrides(tiny_config, [*SCHEDULE, f"train.output_dir={out}", *extra], "test")


def run(config, world=1):
    return train(config) if world == 1 else run_distributed(train, world, args=(config,))[0]


def test_directory_contents_and_metadata(tiny_config, tmp_path):
    result = train(
        config_for(
            tiny_config,
            tmp_path,
            "checkpoint.interval=2",
            "checkpoint.keep_last=0",
            "train.max_steps=4",
        )
    )
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004" == result.checkpoint.name
    metadata = read_metadata(result.checkpoint)
    assert metadata["format_version"] == 2 and metadata["step"] == 4
    assert metadata["consumed_samples"] == 32 and metadata["world_size"] == 1
    assert metadata["layout"] == {
        "tensor": 1,
        "pipeline": 1,
        "data": 1,
        "context": 1,
        "zero_stage": 0,
        "virtual_stages": 1,
    }
    assert metadata["loss"] == pytest.approx(result.losses[-1])
    assert {"time", "megagpt_version", "torch_version", "lr"} <= metadata.keys()
    assert (result.checkpoint / "config.yaml").is_file()
    assert (result.checkpoint / "tokenizer.model").is_file()


def test_async_save_reports_blocking_and_background_time(tiny_config, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(config_for(tiny_config, tmp_path, "train.max_steps=2", "checkpoint.interval=1"))
    text = caplog.text
    assert "training blocked" in text and "writing in the background" in text
    assert "s in total" in text and "of it blocking training" in text


def test_retention_keeps_last_and_every(tmp_path):
    for step in range(1, 6):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "metadata.json").write_text("{}")
    deleted = apply_retention(tmp_path, keep_last=2, keep_every=2)
    assert sorted(p.name for p in deleted) == ["step_00000001", "step_00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000002",
        "step_00000004",
        "step_00000005",
    ]


def test_incomplete_saves_are_ignored_and_cleaned(tiny_config, tmp_path):
    result = train(config_for(tiny_config, tmp_path, "train.max_steps=1"))
    root = result.checkpoint.parent
    (root / ".step_00000009.partial" / "state").mkdir(parents=True)
    (root / "latest.partial").write_text("step_00000009\n")
    (root / "step_00000007").mkdir()  # a directory without metadata.json is incomplete
    assert resolve_checkpoint_dir(root) == result.checkpoint
    removed = remove_incomplete(root)
    assert {p.name for p in removed} == {".step_00000009.partial", "latest.partial"}


def test_newer_format_and_shape_mismatch_are_refused(tiny_config, tmp_path):
    result = train(config_for(tiny_config, tmp_path, "train.max_steps=1"))
    path = result.checkpoint
    (path / "config.yaml").write_text(
        (path / "config.yaml").read_text().replace("hidden_size: 64", "hidden_size: 96")
    )
    with pytest.raises(
        CheckpointError,
        match=r"embed_tokens.weight: checkpoint \(512, 64\) "
        r"vs model \(512, 96\)",
    ):
        load_model_for_inference(path)
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99.*upgrade megagpt"):
        load_model_for_inference(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_tampered_checkpoints_never_run_code(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(config_for(tiny_config, tmp_path / "run", "train.max_steps=1"))
    index = result.checkpoint / "state" / ".metadata"
    index.write_bytes(pickle.dumps({"exploit": _Exploit()}))
    with pytest.raises(CheckpointError, match=r"state/\.metadata: .* bytes, but"):
        load_model_for_inference(result.checkpoint)  # the checksums catch it first
    # Someone who also rewrites metadata.json's checksum meets the restricted unpickler.
    meta = json.loads((result.checkpoint / "metadata.json").read_text())
    meta["checksums"]["state/.metadata"] = file_summary(index)
    (result.checkpoint / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(pickle.UnpicklingError, match="posix.system.*refusing"):
        load_model_for_inference(result.checkpoint)
    buffer = io.BytesIO()
    torch.save({"exploit": _Exploit()}, buffer)
    buffer.seek(0)
    planner = SafeLoadPlanner()
    planner.state_dict = {}
    item = type("ReadItem", (), {"dest_index": type("Index", (), {"fqn": "x"})()})()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        planner.load_bytes(item, buffer)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "world, layout",
    [
        (1, []),
        (4, ["parallel.tensor_parallel_size=2", "parallel.zero_stage=1"]),
    ],
    ids=["1-rank", "tp2-dp2"],
)
def test_resume_is_bit_identical(tiny_config, tmp_path, world, layout):
    """6 uninterrupted steps == 3 steps, then a resumed run of 3 more: every loss and
    every final weight equal bit for bit."""
    whole = run(config_for(tiny_config, tmp_path / "whole", "train.max_steps=6", *layout), world)
    first = run(config_for(tiny_config, tmp_path / "split", "train.max_steps=3", *layout), world)
    second = run(
        config_for(
            tiny_config, tmp_path / "split", "train.max_steps=6", "checkpoint.resume=auto", *layout
        ),
        world,
    )
    assert second.start_step == 3
    assert first.losses + second.losses == whole.losses  # exact float equality
    a = consolidated_state_dict(tmp_path / "whole")[0]
    b = consolidated_state_dict(tmp_path / "split")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "saved_by, resumed_by",
    [
        (
            (
                8,
                [
                    "parallel.tensor_parallel_size=2",
                    "parallel.pipeline_parallel_size=2",
                    "parallel.zero_stage=1",
                ],
            ),
            (1, []),
        ),
        ((1, []), (4, ["parallel.zero_stage=3"])),
    ],
    ids=["tp2-pp2-dp2-to-dp1", "dp1-to-dp4-zero3"],
)
def test_resume_on_another_layout(tiny_config, tmp_path, saved_by, resumed_by):
    """A checkpoint from one layout continues on another with the same data order:
    the losses after resuming match the original layout's own continuation."""
    world, layout = saved_by
    original = run(
        config_for(
            tiny_config,
            tmp_path / "original",
            "train.max_steps=6",
            "checkpoint.interval=3",
            "checkpoint.keep_last=0",
            *layout,
        ),
        world,
    )
    middle = tmp_path / "original" / "checkpoints" / "step_00000003"
    world, layout = resumed_by
    resumed = run(
        config_for(
            tiny_config,
            tmp_path / "resumed",
            "train.max_steps=6",
            f"checkpoint.resume={middle}",
            *layout,
        ),
        world,
    )
    assert resumed.start_step == 3
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(original.losses[3:]), rtol=1e-5, atol=0
    )


KILL_TRIALS = 10


def test_sigkill_during_saves_always_leaves_a_loadable_checkpoint(
    dataset_prefix, tokenizer, tmp_path
):
    """A run saving after every step is SIGKILLed at random moments; afterwards every
    checkpoint that carries a real name matches its checksums and loads, and `latest`
    names one of them (and the next trial takes the dead run's lock over)."""
    rng = random.Random(1234)
    out = tmp_path / "run"
    overrides = tiny_overrides(dataset_prefix, tokenizer, out) + [
        "train.max_steps=100000",
        "checkpoint.interval=1",
        "checkpoint.keep_last=3",
        "model.n_layers=4",
        "model.hidden_size=256",
        "model.n_heads=4",
        "train.eval_interval=0",
        "logging.tensorboard=false",
        "checkpoint.resume=auto",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    partial_seen = 0
    for trial in range(KILL_TRIALS):
        process = subprocess.Popen(
            [sys.executable, "-m", "megagpt", "train", *overrides],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        latest = out / "checkpoints" / "latest"
        before = latest.read_text() if latest.exists() else None
        deadline = time.monotonic() + 120
        while (not latest.exists() or latest.read_text() == before) and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint was published"
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        root = out / "checkpoints"
        partial_seen += any(p.name.endswith(".partial") for p in root.iterdir())
        named = sorted(p for p in root.glob("step_*"))
        assert named, f"trial {trial}: nothing left"
        for directory in named:  # every visible checkpoint is whole, to the checksum
            assert checkpoint_problems(directory) == [], directory
            load_model_for_inference(directory)
        assert resolve_checkpoint_dir(out) in named
    assert partial_seen >= 1, "no kill landed inside a save; the test proved nothing"


def test_a_checkpoint_from_the_middle_of_a_run_resumes_bit_for_bit(tiny_config, tmp_path):
    """Saves after every step of a run; resuming from the step-3 one repeats steps 4-6
    exactly. (These writes are too small to race the next update; the test below
    makes the writer slow enough to lose that race without before_update.)"""
    whole = train(
        config_for(
            tiny_config,
            tmp_path / "whole",
            "train.max_steps=6",
            "checkpoint.interval=1",
            "checkpoint.keep_last=0",
        )
    )
    middle = tmp_path / "whole" / "checkpoints" / "step_00000003"
    resumed = train(
        config_for(
            tiny_config, tmp_path / "resumed", "train.max_steps=6", f"checkpoint.resume={middle}"
        )
    )
    assert resumed.losses == whole.losses[3:]  # bit for bit


def test_an_update_waits_for_the_writer_reading_live_weights(tiny_config, tmp_path):
    """An in-place update right after a save (as optimizer.step would do) must not leak
    into the checkpoint: before_update() waits for the writer. ~100 MB of weights make
    the write far slower than the update, so without the wait the update would win."""
    from megagpt.checkpoint import Checkpointer
    from megagpt.parallel import init_distributed, shutdown_distributed
    from megagpt.parallel.parallelize import parallelize

    config = apply_overrides(
        tiny_config,
        [
            "model.hidden_size=512",
            "model.n_layers=8",
            "model.n_heads=8",
            "checkpoint.async_save=true",
            f"train.output_dir={tmp_path}",
        ],
        "test",
    )
    env = init_distributed("cpu")
    try:
        module = parallelize(config, env)
        before = {k: v.clone() for k, v in module.parts[0].state_dict().items()}
        checkpointer = Checkpointer(config, module, tmp_path / "checkpoints", True)
        checkpointer.save(1, {"consumed_samples": 0})
        checkpointer.before_update()
        with torch.no_grad():
            for param in module.parameters():
                param.add_(1.0)  # the update
        checkpointer.wait()
    finally:
        shutdown_distributed(env)
    saved, _ = consolidated_state_dict(tmp_path)
    assert all(torch.equal(saved[k], before[k]) for k in before)
