"""Overfitting controls: the train/validation gap, early stopping, keep-best, epochs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from megagpt.checkpoint import read_metadata, resolve_checkpoint_dir
from megagpt.config import ConfigError, apply_overrides, load_config
from megagpt.config.metric_mode import metric_mode
from megagpt.data import build_datasets
from megagpt.data.epochs import check_epochs, epochs_read
from megagpt.testing import run_distributed
from megagpt.training.overfitting import EarlyStopping
from megagpt.training.trainer import train
from tests.conftest import tiny_overrides, write_documents

# The learning rate of a step does not depend on max_steps, so a run cut short and
# resumed follows the schedule of the uninterrupted one (as in test_checkpoint.py).
STEADY = ["optim.decay_steps=60", "logging.tensorboard=false", "checkpoint.keep_last=0"]


def configured(tiny_config, out: Path, *extra: str):
    return apply_overrides(tiny_config, [*STEADY, f"train.output_dir={out}", *extra], "test")


def evaluations(out: Path) -> dict[int, dict]:
    """The records of metrics.jsonl that hold an evaluation, by step."""
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r for r in records if "val_loss" in r}


# ---------------------------------------------------------------- the metric's direction
def test_auto_mode_reads_the_metric_name():
    for name in ("val_loss", "val_ppl", "train_val_gap", "eval/wiki/bpb", "eval/cloze/ppl"):
        assert metric_mode(name) == "min", name
    for name in ("val_accuracy", "val_macro_f1", "eval/piqa/acc", "eval/hs/acc_norm", "acc,none"):
        assert metric_mode(name) == "max", name
    assert metric_mode("val_accuracy", "min") == "min"  # an explicit mode wins


# ---------------------------------------------------------------- early stopping
def test_early_stopping_hook_on_a_synthetic_sequence():
    """Improvements must beat the best by more than min_delta; the stop comes at the
    patience-th evaluation without one, naming the metric, the step and the best."""
    hook = EarlyStopping("val_loss", patience=2, min_delta=0.1, every=10)
    values = {10: 3.0, 20: 2.5, 30: 2.45, 40: 2.35, 50: 2.39, 60: 2.41}
    stops = {step: hook(step, {"val_loss": value}) for step, value in values.items()}
    # 30: 0.05 better, not enough; 40: 0.15 better than 2.5, a new best; 50, 60: none.
    assert [s for s, reason in stops.items() if reason] == [60]
    assert stops[60] == (
        "early stopping: val_loss has not improved by min_delta=0.1 for 2 evaluations since "
        "step 40 (best 2.35; train.early_stopping.patience=2)"
    )
    accuracy = EarlyStopping("val_accuracy", patience=1, every=1)  # auto: higher is better
    assert accuracy(1, {"val_accuracy": 0.5}) is None
    assert accuracy(2, {"val_accuracy": 0.6}) is None
    assert accuracy(3, {"val_accuracy": 0.6}) is not None  # equal is no improvement


def test_early_stopping_skips_what_it_should_not_count():
    """NaN never improves; an evaluation off the interval (the end of a run cut short)
    or without the metric (task metrics on their own schedule) is not counted."""
    hook = EarlyStopping("val_loss", patience=2, every=5)
    assert hook(5, {"val_loss": 2.0}) is None
    assert hook(7, {"val_loss": 9.0}) is None and hook.since == 0  # off the interval
    assert hook(10, {"eval/x/acc": 0.3}) is None and hook.since == 0  # not measured
    assert hook(15, {"val_loss": math.nan}) is None and hook.since == 1
    assert "since step 5 (best 2;" in hook(20, {"val_loss": 2.0})


def test_early_stopping_state_round_trips():
    values = [3.0, 2.0, 2.5, 2.6, 2.7]
    whole = EarlyStopping("val_loss", patience=3)
    reasons = [whole(step, {"val_loss": v}) for step, v in enumerate(values, 1)]
    first = EarlyStopping("val_loss", patience=3)
    for step, v in enumerate(values[:3], 1):
        first(step, {"val_loss": v})
    second = EarlyStopping("val_loss", patience=3)
    second.restore(json.loads(json.dumps(first.state())))  # as checkpoint metadata
    assert [second(step, {"val_loss": v}) for step, v in [(4, 2.6), (5, 2.7)]] == reasons[3:]
    assert reasons[-1] is not None
    other = EarlyStopping("val_ppl", patience=3)
    other.restore(first.state())  # another metric's record is not taken over
    assert other.best is None


def test_a_real_run_stops_early_and_a_resumed_one_stops_at_the_same_step(tiny_config, tmp_path):
    """The stop step is the one the rule gives on the logged validation losses; a run
    interrupted at the evaluation before it (mid-streak) and resumed stops there too,
    with the same losses."""
    stopping = ["train.max_steps=60", "train.early_stopping.patience=2"]
    stopping += ["train.early_stopping.min_delta=0.05"]
    whole = train(configured(tiny_config, tmp_path / "whole", *stopping))
    stop = whole.start_step + len(whole.losses)
    logged = evaluations(tmp_path / "whole")
    best, since, expected = math.inf, 0, None
    for step, record in sorted(logged.items()):  # the rule, applied by hand
        if record["val_loss"] < best - 0.05:
            best, since = record["val_loss"], 0
        else:
            since += 1
        if since == 2:
            expected = step
            break
    assert expected is not None and expected < 60, "the run never plateaued: no test"
    assert stop == expected and whole.stop_reason.startswith("early stopping: val_loss")
    assert resolve_checkpoint_dir(tmp_path / "whole").name == f"step_{stop:08d}"

    cut = stop - tiny_config.train.eval_interval  # one evaluation without improvement in
    first = train(configured(tiny_config, tmp_path / "split", *stopping, f"train.max_steps={cut}"))
    assert first.stop_reason is None
    state = read_metadata(first.checkpoint)["early_stopping"]
    assert state["evaluations_since_best"] == 1
    second = train(configured(tiny_config, tmp_path / "split", *stopping, "checkpoint.resume=auto"))
    assert second.start_step == cut
    assert second.start_step + len(second.losses) == stop
    assert second.stop_reason == whole.stop_reason
    assert first.losses + second.losses == whole.losses


# ---------------------------------------------------------------- keep-best
@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_keeps_the_best_checkpoint_across_a_resume(tiny_config, tmp_path, mode):
    """keep_last=1 and saves only at the end, yet the checkpoint of the best evaluation
    (by metrics.jsonl) is saved when it happens, kept, and named by `best`, also after
    a resume. mode=max picks the worst loss, an early one: a best that is not the
    newest checkpoint, whose survival across the resume is what is tested."""
    out = tmp_path / "run"
    keep = ["checkpoint.keep_last=1", "checkpoint.keep_best=val_loss", "train.eval_interval=2"]
    keep += [f"checkpoint.keep_best_mode={mode}"]
    train(configured(tiny_config, out, *keep, "train.max_steps=4"))
    train(configured(tiny_config, out, *keep, "train.max_steps=8", "checkpoint.resume=auto"))
    logged = {step: r["val_loss"] for step, r in evaluations(out).items()}
    assert sorted(logged) == [2, 4, 6, 8]
    pick = min if mode == "min" else max
    best_step = pick(logged, key=logged.get)
    root = out / "checkpoints"
    best = resolve_checkpoint_dir(root / "best")
    assert best.name == (root / "best").read_text().strip() == f"step_{best_step:08d}"
    assert read_metadata(best)["metrics"]["val_loss"] == pytest.approx(logged[best_step], abs=1e-6)
    kept = sorted(p.name for p in root.glob("step_*"))
    assert kept == sorted({f"step_{best_step:08d}", "step_00000008"})
    if mode == "max":
        assert best_step == 2  # the first evaluation, saved off checkpoint.interval


# ---------------------------------------------------------------- the gap
def test_gap_is_logged_and_survives_a_resume(tiny_config, tmp_path, caplog):
    """train_val_gap = val_loss - the mean training loss since the previous scheduled
    evaluation, in metrics.jsonl, TensorBoard and the console; a run cut off the
    interval (at 4, with its own extra evaluation) and resumed logs the same gap at 6."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole_dir = tmp_path / "whole"
    with caplog.at_level(logging.INFO):
        whole = train(configured(tiny_config, whole_dir, "logging.tensorboard=true"))
    logged = evaluations(whole_dir)
    assert sorted(logged) == [3, 6]
    for step, previous in ((3, 0), (6, 3)):
        mean = sum(whole.losses[previous:step]) / (step - previous)
        assert logged[step]["train_val_gap"] == pytest.approx(
            whole.val_losses[step] - mean, abs=2e-6
        )
    events = EventAccumulator(str(whole_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_val_gap")] == [3, 6]
    assert "train-val gap" in caplog.text

    split = tmp_path / "split"
    train(configured(tiny_config, split, "train.max_steps=4"))
    train(configured(tiny_config, split, "train.max_steps=6", "checkpoint.resume=auto"))
    resumed = evaluations(split)
    assert resumed[6]["train_val_gap"] == pytest.approx(logged[6]["train_val_gap"], abs=1e-6)


# ---------------------------------------------------------------- epochs
def test_epochs_per_blended_dataset_warn_past_max_epochs(
    tiny_config, tmp_path, dataset_prefix, documents, tokenizer, caplog
):
    """A small dataset weighted up is read many times while the split as a whole is
    read less than once: the warning names that dataset, and only it."""
    small = write_documents(tmp_path, documents[:40], tokenizer)
    config = apply_overrides(tiny_config, [f"data.path=0.5 {dataset_prefix} 0.5 {small}"], "test")
    splits = build_datasets(config.data, config.train.seed)
    samples = 4000
    counts = {c.name: c for c in epochs_read(splits.train, samples)}
    big, tiny = counts[f"{dataset_prefix}:train"], counts[f"{small}:train"]
    assert big.share == tiny.share == pytest.approx(0.5, abs=1e-4)
    assert tiny.epochs == pytest.approx(0.5 * samples / tiny.samples_per_epoch, rel=1e-4)
    assert big.epochs < samples / len(splits.train) < 1 < 4 < tiny.epochs
    with caplog.at_level(logging.WARNING):
        check_epochs(config.data, splits.train, samples)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{small}:train" in warnings[0]
    assert f"{dataset_prefix}:train" not in warnings[0] and "data.max_epochs = 4" in warnings[0]


def test_epochs_error_stops_the_run_before_the_model_is_built(tiny_config, tmp_path):
    out = tmp_path / "run"
    config = configured(tiny_config, out, "data.max_epochs=0.0001", "data.max_epochs_action=error")
    with pytest.raises(
        ConfigError, match=r"data.max_epochs = 0.0001: the run would read \S+:train [\d.e-]+ times"
    ):
        train(config)
    assert not (out / "config.yaml").exists()  # written only once the model is built


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.early_stopping.patience=2", "train.eval_interval=0"], "needs evaluations"),
        (["checkpoint.keep_best=val_loss", "train.eval_interval=0"], "needs evaluations"),
        (["train.early_stopping.min_delta=-1"], "must be >= 0"),
        (["data.max_epochs=0"], "data.max_epochs = 0.0: must be positive"),
        (["data.max_epochs_action=stop"], "one of 'warn', 'error'"),
    ],
)
def test_bad_settings_are_refused_by_name(dataset_prefix, tokenizer, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*tiny_overrides(dataset_prefix, tokenizer, tmp_path), *overrides])


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.early_stopping.metric=val_acc", "not a metric this run evaluates; choose one of"),
        ("checkpoint.keep_best=val_accuracy", "val_loss, val_ppl, train_val_gap"),
        ("checkpoint.keep_best=eval/piqa/acc", "eval.tasks, which this run does not evaluate"),
    ],
)
def test_an_unknown_watched_metric_fails_before_the_model_is_built(
    tiny_config, tmp_path, setting, message
):
    out = tmp_path / "run"
    config = configured(tiny_config, out, "train.early_stopping.patience=1", setting)
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (out / "config.yaml").exists()


def test_early_stopping_and_keep_best_on_two_ranks_match_one_process(tiny_config, tmp_path):
    """Under tensor parallelism, the main rank's decisions (stop, save as best) reach
    every rank: the run stops at the step one process stops at, with the same best."""
    settings = ["train.max_steps=12", "train.eval_interval=2", "train.early_stopping.patience=1"]
    settings += ["train.early_stopping.min_delta=1e9", "checkpoint.keep_best=val_loss"]
    settings += ["checkpoint.keep_best_mode=max", "checkpoint.keep_last=1"]
    one = train(configured(tiny_config, tmp_path / "one", *settings))
    config = configured(tiny_config, tmp_path / "tp2", *settings, "parallel.tensor_parallel_size=2")
    two = run_distributed(train, 2, args=(config,))[0]
    # min_delta=1e9: only the first evaluation "improves"; patience 1 stops at the next.
    assert one.start_step + len(one.losses) == len(two.losses) == 4
    assert two.stop_reason == one.stop_reason
    for run in ("one", "tp2"):
        root = tmp_path / run / "checkpoints"
        assert resolve_checkpoint_dir(root / "best").name == "step_00000002"
        assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000004"]
