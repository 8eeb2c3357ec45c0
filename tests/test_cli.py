"""The commands a user types, run as subprocesses."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import tiny_overrides


def megagpt(*args, cwd=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "megagpt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained_run(dataset_prefix, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    done = megagpt("train", *tiny_overrides(dataset_prefix, tokenizer, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_train_logs_progress(trained_run):
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_generate_from_a_checkpoint(trained_run):
    args = (
        "generate",
        "--checkpoint",
        str(trained_run),
        "--prompt",
        "The for statement",
        "--max-new-tokens",
        "12",
        "--seed",
        "3",
        "--num-samples",
        "2",
    )
    first, second = megagpt(*args), megagpt(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The for statement")
    assert first.stdout == second.stdout  # seeded
    greedy_args = ("generate", "--checkpoint", str(trained_run), "--prompt", "x")
    greedy_args += ("--temperature", "0", "--max-new-tokens", "5")
    greedy, cached = megagpt(*greedy_args, "--no-cache"), megagpt(*greedy_args)
    assert greedy.returncode == 0 and greedy.stdout.startswith("x"), greedy.stderr
    assert greedy.stdout == cached.stdout


def test_eval_reports_loss_and_perplexity(trained_run):
    done = megagpt("eval", "--checkpoint", str(trained_run), "--iters", "2")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["step"] == 6 and result["split"] == "valid"
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    metrics = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert result["loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-4)
    empty = megagpt("eval", "--checkpoint", str(trained_run), "--split", "test")
    assert empty.returncode == 2 and "leaves the test split empty" in empty.stderr


def test_missing_checkpoint_and_data_are_clear_errors(tmp_path):
    done = megagpt("generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert done.returncode == 2 and "no checkpoint at" in done.stderr
    done = megagpt("train", f"data.path={tmp_path / 'nope'}", f"train.output_dir={tmp_path}")
    assert done.returncode == 2 and "nope.idx: file not found" in done.stderr


@pytest.mark.parametrize(
    "nproc, layout",
    [
        (1, []),
        # the command the 3-D parallelism issue names: 4 CPU processes, pipeline 2 x tensor 2
        (4, ["parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2"]),
    ],
)
def test_demo_end_to_end(tmp_path, nproc, layout):
    done = megagpt(
        "demo",
        "--nproc",
        str(nproc),
        "--output-dir",
        str(tmp_path / "demo"),
        "train.max_steps=20",  # two evaluations, the second lower: enough to show learning
        "train.eval_interval=10",
        "optim.warmup_steps=5",
        *layout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in (
        "[1/5] corpus",
        "[2/5] tokenizer",
        "[3/5] data",
        "[4/5] training",
        "[5/5] generation",
    ):
        assert step in out
    losses = [
        float(x)
        for x in re.findall(r"\d+: (\d+\.\d+)", out.split("validation loss:")[1].splitlines()[0])
    ]
    assert len(losses) == 2 and losses[1] < losses[0]
    if nproc > 1:
        assert "pipeline 2 x data 1 x tensor 2" in out
    samples = [line for line in out.splitlines() if line.startswith("  >>> ")]
    assert len(samples) == 2 and all(len(s) > 12 for s in samples)
    rerun = megagpt("demo", "--output-dir", str(tmp_path), "train.max_steps=1")
    assert rerun.returncode == 2 and "was not made by the demo" in rerun.stderr
