import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint import consolidated_state_dict, read_metadata, resolve_checkpoint_dir
from megagpt.config import apply_overrides, load_config
from megagpt.testing import free_port, run_distributed
from megagpt.training.trainer import NonFiniteLossError, train
from tests.conftest import tiny_overrides


def read_metrics(output_dir):
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def final_weights(output_dir):
    return consolidated_state_dict(output_dir)[0]


def assert_same_run(reference, other, rtol=1e-5):
    assert len(reference.losses) == len(other.losses)
    torch.testing.assert_close(
        torch.tensor(other.losses), torch.tensor(reference.losses), rtol=rtol, atol=0
    )
    assert reference.val_losses.keys() == other.val_losses.keys()
    for step in reference.val_losses:
        assert other.val_losses[step] == pytest.approx(reference.val_losses[step], rel=rtol)


def test_run_writes_config_metrics_tensorboard_and_checkpoint(tiny_config):
    result = train(tiny_config)
    out = Path(tiny_config.train.output_dir)
    assert load_config(out / "config.yaml") == tiny_config
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= record.keys()
        assert record["tokens_per_s"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert records[-1]["loss"] == pytest.approx(result.losses[-1], rel=1e-5)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert result.checkpoint == out / "checkpoints" / "step_00000006"
    assert resolve_checkpoint_dir(out) == result.checkpoint
    metadata = read_metadata(result.checkpoint)
    assert metadata["step"] == 6 and metadata["consumed_samples"] == 6 * 8
    assert metadata["consumed_tokens"] == 6 * 8 * 32
    assert load_config(result.checkpoint / "config.yaml") == tiny_config
    assert (result.checkpoint / "tokenizer.model").is_file()
    assert (result.checkpoint / "state" / ".metadata").is_file()


def test_mfu_never_exceeds_100_percent(tiny_config, caplog):
    """A peak below what the run achieves (a CPU peak measured while the machine was
    busy; here a tiny configured one) is raised to the achieved rate, with a warning."""
    config = apply_overrides(tiny_config, ["logging.peak_tflops=1e-9"], "test")
    with caplog.at_level("WARNING"):
        train(config)
    mfu = [r["mfu"] for r in read_metrics(config.train.output_dir)]
    assert max(mfu) <= 1.0 and mfu[0] == 1.0
    assert any("above the logging.peak_tflops peak" in r.getMessage() for r in caplog.records)


def test_training_reduces_the_loss(tiny_config):
    config = apply_overrides(
        tiny_config,
        ["train.max_steps=40", "train.eval_interval=4", "optim.lr=3e-3", "optim.warmup_steps=5"],
        "test",
    )
    result = train(config)
    assert result.val_losses[40] < result.val_losses[4] - 0.5  # 5.9 -> 5.1 when written


def test_gradient_accumulation_equals_one_large_batch(tiny_config):
    one_pass = train(apply_overrides(tiny_config, ["train.micro_batch_size=8"], "test"))
    accumulated = train(apply_overrides(tiny_config, ["train.micro_batch_size=2"], "test"))
    assert_same_run(one_pass, accumulated)


def test_non_finite_loss_stops_with_the_step_and_saves_nothing(tiny_config):
    config = apply_overrides(
        tiny_config,
        ["optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0", "checkpoint.interval=1"],
        "test",
    )
    with pytest.raises(NonFiniteLossError, match=r"step (\d+): loss is (nan|inf)") as error:
        train(config)
    failed_step = int(error.value.args[0].split(":")[0].split()[1])
    root = Path(config.train.output_dir) / "checkpoints"
    saved = sorted(p.name for p in root.iterdir() if p.name != "latest")
    # every checkpoint predates the failed step, none is partial, latest is the last good one
    assert saved and all(int(name.split("_")[1]) < failed_step for name in saved)
    assert (root / "latest").read_text().strip() == saved[-1]


def test_two_data_parallel_ranks_match_one_process(tiny_config):
    reference = train(tiny_config)
    parallel_config = apply_overrides(
        tiny_config, [f"train.output_dir={tiny_config.train.output_dir}-dp2"], "test"
    )
    results = run_distributed(train, world_size=2, args=(parallel_config,))
    assert_same_run(reference, results[0])
    assert results[0].losses == results[1].losses  # every rank logs the global loss
    ref_weights = final_weights(tiny_config.train.output_dir)
    dp_weights = final_weights(parallel_config.train.output_dir)
    for name, tensor in ref_weights.items():
        # Adam turns float noise in near-zero gradients into lr-sized steps, so weights are
        # compared to 1e-5 absolute (they are ~0.02 in size); 1.5e-6 was seen.
        torch.testing.assert_close(dp_weights[name], tensor, rtol=1e-5, atol=1e-5)


def test_a_one_rank_process_group_is_the_one_process_layout(tiny_config):
    """A process group of one rank made by the caller (torchrun --nproc-per-node 1, a
    notebook) runs the layout of size one, the same code as a lone process."""
    reference = train(tiny_config)
    config = apply_overrides(
        tiny_config, [f"train.output_dir={tiny_config.train.output_dir}-pg1"], "test"
    )
    (result,) = run_distributed(train, world_size=1, args=(config,))
    assert_same_run(reference, result)


def test_torchrun_command_line_matches_one_process(dataset_prefix, tokenizer, tmp_path):
    def run(nproc, name):
        overrides = tiny_overrides(dataset_prefix, tokenizer, tmp_path / name)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "-m",
            "megagpt",
            "train",
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return read_metrics(tmp_path / name), done.stdout

    single, _ = run(1, "one")
    double, log = run(2, "two")
    assert "data parallel: 2 replicas" in log
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_max_nan_skips_skips_then_stops(tiny_config):
    """Step 1 updates with an absurd learning rate, so every later step is NaN: two are
    skipped without an update (train.max_nan_skips=2), the third stops the run."""
    config = apply_overrides(
        tiny_config,
        [
            "optim.lr=1e30",
            "optim.grad_clip=0",
            "optim.warmup_steps=0",
            "train.max_nan_skips=2",
            "checkpoint.interval=1",
        ],
        "test",
    )
    with pytest.raises(NonFiniteLossError, match=r"step 4: .*\(2 earlier steps were skipped"):
        train(config)
    metrics = [json.loads(line) for line in open(Path(config.train.output_dir) / "metrics.jsonl")]
    assert [r["step"] for r in metrics] == [1]  # skipped steps log no metrics


def stop_at_step_3(step, metrics):
    return f"val_loss {metrics['val_loss']:.3f} seen at step {step}" if step >= 3 else None


def test_an_evaluation_hook_stops_every_rank_after_its_step(tiny_config, tmp_path):
    """A hook sees each evaluation's metrics (on the main rank); its reason stops the
    run after that step, on every rank, with a checkpoint of that step."""
    seen = []
    config = apply_overrides(tiny_config, ["train.eval_interval=1", "train.max_steps=6"], "t")
    result = train(config, hooks=[lambda step, m: seen.append((step, sorted(m))), stop_at_step_3])
    assert [s for s, _ in seen] == [1, 2, 3] and "val_loss" in seen[0][1]
    assert len(result.losses) == 3 and result.stop_reason.startswith("val_loss")
    assert read_metadata(resolve_checkpoint_dir(config.train.output_dir))["step"] == 3
    parallel = apply_overrides(config, [f"train.output_dir={tmp_path / 'dp2'}"], "dp2")
    results = run_distributed(train, 2, args=(parallel, [stop_at_step_3]))
    assert [len(r.losses) for r in results] == [3, 3]
