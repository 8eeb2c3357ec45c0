import json
import math

import pytest

from megagpt.config import ConfigError
from megagpt.launch.report import collect_results, format_report
from megagpt.launch.sweep import Sweep, plan_sweep, sweep_points
from tests.conftest import tiny_overrides
from tests.test_cli import megagpt


def test_grid_is_every_combination_in_order():
    points = sweep_points(["optim.lr=1e-3,3e-4", "model.n_layers=2,4"])
    assert points == [
        {"optim.lr": "1e-3", "model.n_layers": "2"},
        {"optim.lr": "1e-3", "model.n_layers": "4"},
        {"optim.lr": "3e-4", "model.n_layers": "2"},
        {"optim.lr": "3e-4", "model.n_layers": "4"},
    ]


def test_random_search_draws_within_ranges_and_repeats_with_its_seed():
    args = (["model.n_heads=2,4"], ["optim.lr=loguniform:1e-4:1e-2", "model.n_layers=int:1:3"])
    points = sweep_points(*args, random_runs=20, seed=7)
    assert points == sweep_points(*args, random_runs=20, seed=7)
    assert points != sweep_points(*args, random_runs=20, seed=8)
    assert {p["model.n_heads"] for p in points} == {"2", "4"}
    assert {p["model.n_layers"] for p in points} == {"1", "2", "3"}
    lrs = [float(p["optim.lr"]) for p in points]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    # log-uniform: about as many draws below the geometric middle as above it
    assert 4 <= sum(lr < math.sqrt(1e-4 * 1e-2) for lr in lrs) <= 16


@pytest.mark.parametrize(
    "grid, samples, random_runs, message",
    [
        (["optim.lr"], [], None, "--grid 'optim.lr': write section.key=value1,value2"),
        (["lr=1,2"], [], None, "--grid 'lr=1,2'"),
        (["optim.lr=1,,2"], [], None, "an empty value between commas"),
        ([], ["optim.lr=normal:0:1"], 3, "DIST one of uniform, loguniform, int"),
        ([], ["optim.lr=loguniform:0:1"], 3, "LOW > 0 for loguniform"),
        ([], ["optim.lr=uniform:1:1e-3"], 3, "needs LOW < HIGH"),
        ([], ["optim.lr=uniform:1e-4:1e-3"], None, "add --random N"),
        (["optim.lr=1,2"], ["optim.lr=uniform:1:2"], 2, "swept more than once: optim.lr"),
        ([], [], None, "nothing to sweep"),
        (["optim.lr=1,2"], [], 0, "--random = 0"),
    ],
)
def test_malformed_sweeps_are_named(grid, samples, random_runs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep_points(grid, samples, random_runs)


def test_every_point_is_checked_before_anything_is_written(tmp_path):
    points = sweep_points(["model.n_heads=4,5"])
    with pytest.raises(ConfigError, match=r"sweep point run-1 \{'model.n_heads': '5'\}: "):
        plan_sweep(tmp_path / "sweep", None, ["model.hidden_size=64"], points)
    assert not (tmp_path / "sweep").exists()
    typo = megagpt("launch", "sweep", f"--output-dir={tmp_path}", "--grid=optim.lrr=1,2")
    assert typo.returncode == 2 and "unknown key optim.lrr" in typo.stderr


def test_sweep_dry_run_prints_the_array_job_and_writes_nothing(tmp_path):
    done = megagpt(
        "launch",
        "sweep",
        f"--output-dir={tmp_path / 'sweep'}",
        "--grid=optim.lr=1,2",
        "--grid=train.seed=1,2",
        "--max-parallel=2",
        "--dry-run",
    )
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --array=0-3%2" in done.stdout
    assert f"megagpt.launch.sweep_run {tmp_path / 'sweep'}" in done.stdout
    assert not (tmp_path / "sweep").exists()


def test_a_local_sweep_and_its_report(dataset_prefix, tokenizer, tmp_path):
    base = [o for o in tiny_overrides(dataset_prefix, tokenizer, tmp_path) if "output_dir" not in o]
    sweep_dir = tmp_path / "sweep"
    done = megagpt(
        "launch",
        "sweep",
        "--local",
        f"--output-dir={sweep_dir}",
        "--grid=optim.lr=1e-2,1e-4",
        *base,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 runs finished" in done.stdout
    sweep = Sweep.load(sweep_dir)
    assert [run.point for run in sweep.runs] == [{"optim.lr": "1e-2"}, {"optim.lr": "1e-4"}]
    report = megagpt("sweep-report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    table, plots = report.stdout.split("\n\n")
    header, first, second = table.splitlines()
    for name in ("validation_curves.png", "best_so_far.png"):  # a grid sweep's plots too
        assert str(sweep_dir / name) in plots
        assert (sweep_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert header.split() == ["rank", "run", "optim.lr", "val_loss", "step", "note"]
    # 6 steps at lr 1e-2 learn more than at 1e-4
    assert first.split()[:3] == ["1", "run-0", "1e-2"] and second.split()[:3] == [
        "2",
        "run-1",
        "1e-4",
    ]
    assert float(first.split()[3]) < float(second.split()[3])


def write_run(directory, records, max_steps=6):
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(f"train:\n  max_steps: {max_steps}\n")
    if records is not None:
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_lists_runs_without_a_final_validation_loss_last_with_the_reason(tmp_path):
    write_run(tmp_path / "good", [{"step": 6, "loss": 3.0, "val_loss": 3.5}])
    write_run(tmp_path / "better", [{"step": 6, "loss": 2.0, "val_loss": 2.5}])
    write_run(tmp_path / "cut", [{"step": 3, "loss": 4.0, "val_loss": 4.0}])
    write_run(tmp_path / "noval", [{"step": 6, "loss": 3.0}])
    write_run(tmp_path / "diverged", [{"step": 6, "loss": 3.0, "val_loss": float("nan")}])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text('{"step": 1, "lo')
    results = collect_results(tmp_path)
    assert [r.name for r in results] == ["better", "good", "broken", "cut", "diverged", "noval"]
    table = format_report(results).splitlines()
    assert table[1].split()[:4] == ["1", "better", "2.5000", "6"]
    notes = {line.split()[1]: line for line in table[3:]}
    assert "unfinished: stopped at step 3 of 6" in notes["cut"]
    assert "no validation loss logged" in notes["noval"]
    assert "validation loss is nan" in notes["diverged"]
    assert "line 1 is not JSON" in notes["broken"]
    with pytest.raises(FileNotFoundError, match="no sweep.json"):
        collect_results(tmp_path / "good" / "nothing")
