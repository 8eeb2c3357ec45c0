"""fp16 training with dynamic loss scaling (train.precision=fp16, train.loss_scale).

CPU autocast computes matmuls and attention in fp16 here as a GPU does, so overflow,
skipping, the scale's moves and their checkpointing are all proven without a GPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint import read_metadata, resolve_checkpoint_dir
from megagpt.config import Config, apply_overrides, load_config
from megagpt.config.schema import LossScaleConfig
from megagpt.parallel import init_distributed, shutdown_distributed
from megagpt.parallel.batches import step_batches
from megagpt.parallel.loss_scale import DynamicLossScaler
from megagpt.parallel.parallelize import parallelize
from megagpt.parallel.train_module import TrainModule, local
from megagpt.testing import run_distributed
from megagpt.training.finetune import build_run_datasets
from megagpt.training.outputs import locked_outputs
from megagpt.training.trainer import NonFiniteLossError, Trainer
from tests.conftest import tiny_overrides


# ---------------------------------------------------------------- the scaler alone
def scaler(**settings) -> DynamicLossScaler:
    return DynamicLossScaler(LossScaleConfig(**settings))


def test_hysteresis_delays_the_backoff_until_growth_refills_it():
    s = scaler(initial_scale=1024.0, hysteresis=2, growth_interval=3)
    s.update(overflow=True)
    assert s.scale == 1024.0  # the first overflow spends the hysteresis budget
    s.update(overflow=True)
    assert s.scale == 512.0
    s.update(overflow=True)  # budget used up: every overflow backs off (DeepSpeed's rule)
    assert s.scale == 256.0
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 512.0  # grown, which refills the budget
    s.update(overflow=True)
    assert s.scale == 512.0


def test_scale_doubles_after_growth_interval_good_steps_in_a_row():
    s = scaler(initial_scale=8.0, hysteresis=1, growth_interval=3)
    for _ in range(2):
        s.update(overflow=False)
    assert s.scale == 8.0
    s.update(overflow=True)  # resets the run of good steps
    assert s.scale == 4.0
    for expected in (4.0, 4.0, 8.0, 8.0, 8.0, 16.0):
        s.update(overflow=False)
        assert s.scale == expected


def test_scale_never_backs_off_below_min_scale():
    s = scaler(initial_scale=8.0, hysteresis=1, backoff_factor=0.25, min_scale=1.0)
    s.update(overflow=True)
    assert s.scale == 2.0
    for _ in range(3):
        s.update(overflow=True)
        assert s.scale == 1.0


def test_scaler_state_round_trips_through_json():
    s = scaler(initial_scale=64.0, hysteresis=3, growth_interval=4)
    for overflow in (True, False, False):
        s.update(overflow)
    restored = scaler(initial_scale=64.0, hysteresis=3, growth_interval=4)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.state_dict() == s.state_dict()
    for overflow in (False, False, True, True, True, False):  # they go on moving alike
        s.update(overflow)
        restored.update(overflow)
        assert restored.scale == s.scale


# ---------------------------------------------------------------- the train module
def fp16_config(config: Config, *overrides: str) -> Config:
    return apply_overrides(config, ["train.precision=fp16", *overrides], "test")


def first_step(config: Config):
    """A fresh module of `config` after the first step's forward and backward."""
    module = parallelize(config, init_distributed("cpu"))
    batches = step_batches(build_run_datasets(config).train, 0, module, config)
    return module, module.global_mean(module.train_step(batches))


def gradients(module: TrainModule) -> dict[str, torch.Tensor]:
    return {n: local(p.grad).clone() for n, p in module.named_parameters() if p.grad is not None}


def test_update_unscales_and_clips_in_one_multiply(tiny_config):
    """The fp16 module's loss and gradients are the fp32 module's, once the scale is
    divided out: the loss it returns, the norm `update` returns and the gradients it
    hands the optimizer (clipped to 0.1, below the norm of ~1.7)."""
    env = init_distributed("cpu")
    try:
        fp32, fp32_loss = first_step(tiny_config)
        fp16, fp16_loss = first_step(fp16_config(tiny_config))
        assert fp32.loss_scale is None and fp16.loss_scale == 65536.0
        # The backward ran on the scaled loss: gradients are 2**16 times fp32's.
        scaled_norm = float(fp16.grad_norm())
        assert scaled_norm == pytest.approx(65536.0 * float(fp32.grad_norm()), rel=1e-2)
        fp32_norm = fp32.update(lr=0.0, max_norm=0.1)
        fp16_norm = fp16.update(lr=0.0, max_norm=0.1)
    finally:
        shutdown_distributed(env)
    # fp16 keeps 11 significant bits (4.9e-4 relative per rounding). When written: the
    # loss within 1e-6, the norm 3.5e-5, every gradient within 8e-4 of its largest entry.
    assert fp16_loss == pytest.approx(fp32_loss, rel=1e-4)
    assert fp16_norm == pytest.approx(fp32_norm, rel=1e-2) and fp32_norm > 0.1
    expected, clipped = gradients(fp32), gradients(fp16)
    total = torch.cat([g.flatten() for g in clipped.values()]).norm()
    assert float(total) == pytest.approx(0.1, rel=1e-4)  # clipped to max_norm, unscaled
    for name, grad in expected.items():
        assert (clipped[name] - grad).abs().max() <= 1e-2 * grad.abs().max(), name
    assert fp16.loss_scale == 65536.0  # one good step: no growth before growth_interval


def test_an_overflow_skips_the_update_and_backs_off(tiny_config):
    env = init_distributed("cpu")
    try:
        config = fp16_config(tiny_config, "train.loss_scale.hysteresis=1")
        module, _ = first_step(config)
        before = {n: local(p).clone() for n, p in module.named_parameters()}
        grad = next(p.grad for p in module.parameters() if p.grad is not None)
        local(grad).view(-1)[0] = math.inf  # as an fp16 overflow in backward leaves it
        assert module.update(lr=1e-2, max_norm=1.0) == math.inf
        assert module.loss_scale == 32768.0
        assert all(p.grad is None for p in module.parameters())  # dropped, not applied
        assert not module.optimizers.state  # the optimizer never stepped
        for name, param in module.named_parameters():
            assert torch.equal(local(param), before[name]), name
        # The next step trains at the lower scale.
        batches = step_batches(build_run_datasets(config).train, 1, module, config)
        module.train_step(batches)
        assert math.isfinite(module.update(lr=1e-2, max_norm=1.0))
        assert {int(s["step"]) for s in module.optimizers.state.values()} == {1}
    finally:
        shutdown_distributed(env)


# ---------------------------------------------------------------- whole runs
def train_on_this_rank(config: Config):
    """train() without its logging set-up, returning what the trainer ended with too:
    (result, loss scaler state, overflow skips). Importable, for gloo ranks."""
    env = init_distributed("cpu")
    try:
        with locked_outputs(config, env):
            trainer = Trainer(config, env)
            result = trainer.run()
        return result, trainer.module.loss_scale_state(), trainer.overflow_skips
    finally:
        shutdown_distributed(env)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def test_fp16_trains_like_fp32(tiny_config, tmp_path):
    """20 steps at lr 1e-3. fp16 rounds each matmul to 11 significant bits (4.9e-4
    relative); the loss, a mean over 256 tokens, averages most of that away, and the
    trajectories drift apart slowly: 2e-5 relative at most when written. 1e-3 leaves
    room for other CPUs' kernels while catching a loss or norm left scaled (2**16)."""
    steps = ["train.max_steps=20", "train.eval_interval=20", "optim.lr=1e-3"]
    fp32 = train_on_this_rank(apply_overrides(tiny_config, steps, "fp32"))[0]
    config = fp16_config(tiny_config, *steps, f"train.output_dir={tmp_path / 'fp16'}")
    fp16, state, overflows = train_on_this_rank(config)
    assert fp16.losses != fp32.losses  # it did compute in fp16
    torch.testing.assert_close(
        torch.tensor(fp16.losses), torch.tensor(fp32.losses), rtol=1e-3, atol=0
    )
    assert fp16.val_losses[20] == pytest.approx(fp32.val_losses[20], rel=1e-3)
    assert fp16.losses[-1] < fp16.losses[0] - 0.3
    norms16 = [r["grad_norm"] for r in read_metrics(tmp_path / "fp16")]
    norms32 = [r["grad_norm"] for r in read_metrics(tiny_config.train.output_dir)]
    assert norms16 == pytest.approx(norms32, rel=1e-2)
    assert overflows == 0 and state["scale"] == 65536.0
    assert all(r["loss_scale"] == 65536.0 for r in read_metrics(tmp_path / "fp16"))
    assert "loss_scale" not in read_metrics(tiny_config.train.output_dir)[0]


def overflow_at_call(calls: int):
    """A TrainModule.train_step that leaves an infinite gradient after its calls-th
    call, as an fp16 overflow in backward does."""
    original = TrainModule.train_step
    count = [0]

    def train_step(self, batches, seeds=None):
        loss = original(self, batches, seeds)
        count[0] += 1
        if count[0] == calls:
            grad = next(p.grad for p in self.parameters() if p.grad is not None)
            local(grad).view(-1)[0] = math.inf
        return loss

    return train_step


def test_an_overflowing_step_is_skipped_counted_logged_and_saved(tiny_config, monkeypatch, caplog):
    config = fp16_config(
        tiny_config, "train.loss_scale.hysteresis=1", "train.max_nan_skips=0", "train.max_steps=6"
    )
    monkeypatch.setattr(TrainModule, "train_step", overflow_at_call(3))
    with caplog.at_level("INFO", logger="megagpt.training.trainer"):
        result, state, overflows = train_on_this_rank(config)
    # Skipped, not held against train.max_nan_skips (0), and the run went on.
    assert result.skipped_steps == [3] and len(result.losses) == 5
    assert overflows == 1 and state["scale"] == 32768.0
    assert any(
        "step 3: fp16 gradients overflowed at loss scale 65536" in r.getMessage()
        and "scale now 32768" in r.getMessage()
        for r in caplog.records
    )
    records = {r["step"]: r for r in read_metrics(config.train.output_dir)}
    assert sorted(records) == [1, 2, 4, 5, 6]
    assert [records[s]["loss_scale"] for s in (2, 4)] == [65536.0, 32768.0]
    assert [records[s]["overflow_skips"] for s in (2, 4)] == [0, 1]
    metadata = read_metadata(resolve_checkpoint_dir(config.train.output_dir))
    assert metadata["overflow_skips"] == 1 and metadata["loss_scale"]["scale"] == 32768.0


def test_a_real_overflow_backs_the_scale_off_until_steps_succeed(tiny_config):
    """At 2**20 the backward overflows fp16 (this model's gradients fit at 2**18 and
    mostly at 2**19 when written): steps are skipped, and the scale halves, until it
    fits. No growth within the run (growth_interval 1000), so each overflow halves it."""
    config = fp16_config(
        tiny_config,
        "train.loss_scale.initial_scale=1048576",
        "train.loss_scale.hysteresis=1",
        "train.max_nan_skips=0",
    )
    result, state, overflows = train_on_this_rank(config)
    assert result.skipped_steps[0] == 1 and len(result.skipped_steps) == overflows
    assert state["scale"] == 2.0**20 / 2**overflows
    assert len(result.losses) == 6 - overflows >= 2 and all(map(math.isfinite, result.losses))


def test_an_overflow_at_min_scale_is_a_non_finite_step(tiny_config, monkeypatch):
    """At train.loss_scale.min_scale loss scaling cannot help: the overflow is held
    against train.max_nan_skips (0 here), which stops the run before the update."""
    config = fp16_config(
        tiny_config,
        "train.loss_scale.initial_scale=1",
        "train.max_nan_skips=0",
        "train.max_steps=3",
    )
    monkeypatch.setattr(TrainModule, "train_step", overflow_at_call(2))
    with pytest.raises(NonFiniteLossError, match=r"step 2: .*gradient norm inf; stopped before"):
        train_on_this_rank(config)


def test_resumed_fp16_run_continues_with_the_saved_scale(tiny_config, tmp_path):
    """4 uninterrupted steps == 2, then 2 resumed: the scale (doubled after every good
    step, so not the initial one at the checkpoint) and every loss equal exactly."""
    scaling = ["train.loss_scale.initial_scale=1024", "train.loss_scale.growth_interval=1"]

    def run(name, *overrides):
        out = f"train.output_dir={tmp_path / name}"
        return train_on_this_rank(fp16_config(tiny_config, *scaling, out, *overrides))

    whole, whole_state, _ = run("whole", "train.max_steps=4")
    first, _, _ = run("split", "train.max_steps=2")
    second, state, _ = run("split", "train.max_steps=4", "checkpoint.resume=auto")
    assert second.start_step == 2
    assert first.losses + second.losses == whole.losses  # exact float equality
    assert state == whole_state and state["scale"] == 16384.0
    scales = [r["loss_scale"] for r in read_metrics(tmp_path / "split")]
    assert scales == [r["loss_scale"] for r in read_metrics(tmp_path / "whole")]
    assert scales == [2048.0, 4096.0, 8192.0, 16384.0]


def train_overflowing_on_the_last_rank(config: Config, step: int):
    """train_on_this_rank with an infinite gradient at `step` on the last rank only
    (an overflow in one rank's backward); importable, for gloo ranks."""
    original = TrainModule.train_step
    if init_distributed("cpu").rank == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        TrainModule.train_step = overflow_at_call(step)
    try:
        return train_on_this_rank(config)
    finally:
        TrainModule.train_step = original


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.zero_stage=1"],
        pytest.param(
            ["parallel.pipeline_parallel_size=2", "parallel.pipeline_schedule=1f1b"],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["dp2-zero1", "pp2-1f1b"],
)
def test_two_ranks_match_one_process_in_fp16(layout, dataset_prefix, tokenizer, tmp_path):
    """An overflow at step 3 in one rank's backward: every rank skips that step (the
    norm is global) and ends with the same scale, and the losses are one process's.
    The ranks compute the fp16 forward of each sample as one process does, and backward
    values that are one process's times a power of two (under dp2 each rank's loss
    weighs dp / N; the pipeline's loss carries the scale in ScaledLoss), exact in
    floating point; so only fp32 sums are ordered differently and the fp32 layouts'
    tolerance (1e-5, test_parallel.py) holds: 1.6e-6 (dp2) and 7.9e-7 (pp2) when
    written. The scale, 2**16, is 4x below what overflows this model (2**18)."""
    config = load_config(
        None,
        tiny_overrides(dataset_prefix, tokenizer, tmp_path / "one")
        + ["train.precision=fp16", "train.loss_scale.hysteresis=1", "logging.tensorboard=false"],
    )
    reference, reference_state, _ = train_overflowing_on_the_last_rank(config, 3)
    assert reference.skipped_steps == [3] and reference_state["scale"] == 32768.0
    parallel = apply_overrides(config, [*layout, f"train.output_dir={tmp_path / 'two'}"], "two")
    per_rank = run_distributed(train_overflowing_on_the_last_rank, 2, args=(parallel, 3))
    for result, state, overflows in per_rank:
        assert result.skipped_steps == [3] and overflows == 1
        assert state == reference_state
        torch.testing.assert_close(
            torch.tensor(result.losses), torch.tensor(reference.losses), rtol=1e-5, atol=0
        )
