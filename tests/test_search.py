"""Guided search (Optuna), its report and plots, `megagpt compare`, and W&B logging.

The sampler, pruners and journal storage are Optuna's own, driven through megagpt's
hooks: a few wiring tests feed a trial's hook chosen metrics, and one local search
trains real tiny trials end to end. Nothing reaches the network (WANDB_MODE=offline).
"""

from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path

import pytest
import yaml

from megagpt.config import ConfigError, load_config
from megagpt.errors import MissingFileError
from megagpt.launch.compare import format_comparison, summarize_runs
from megagpt.launch.search import Search, override_value, parse_space, plan_search
from megagpt.launch.search_run import PruningHook, claim_trial, finish_trial
from megagpt.training.trainer import train
from tests.conftest import tiny_overrides
from tests.test_cli import megagpt

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def search_overrides(dataset_prefix, tokenizer, tmp_path) -> list[str]:
    """Tiny trials: 6 steps, an evaluation every 2 (the pruner's rungs)."""
    base = tiny_overrides(dataset_prefix, tokenizer, tmp_path)
    return [o for o in base if not o.startswith("train.output_dir=")] + [
        "train.max_steps=6",
        "train.eval_interval=2",
        "optim.min_lr=0",
        "logging.tensorboard=false",
    ]


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking it is one."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_the_space_from_grid_and_samples():
    space = parse_space(
        ["model.n_layers=1,2"],
        ["optim.lr=loguniform:1e-4:1e-2", "train.seed=int:1:3", "optim.weight_decay=uniform:0:0.1"],
    )
    kinds = {p.key: (p.kind, p.log) for p in space}
    assert kinds == {
        "model.n_layers": ("categorical", False),
        "optim.lr": ("float", True),
        "train.seed": ("int", False),
        "optim.weight_decay": ("float", False),
    }
    assert space[0].distribution().choices == ("1", "2")
    assert space[2].edge_values() == ["1", "2", "3"]
    # a float reaches the config as the exact number the study holds
    value = 0.1 + 0.2
    assert override_value(value) == "0.30000000000000004" and float(override_value(value)) == value
    with pytest.raises(ConfigError, match="searched more than once: optim.lr"):
        parse_space(["optim.lr=1,2"], ["optim.lr=uniform:1:2"])
    with pytest.raises(ConfigError, match="needs keys to search"):
        parse_space([], [])


def test_a_bad_search_fails_before_anything_is_written(dataset_prefix, tokenizer, tmp_path):
    base = search_overrides(dataset_prefix, tokenizer, tmp_path)
    directory = tmp_path / "search"
    heads = parse_space(["model.n_heads=4,5"], [])
    with pytest.raises(ConfigError, match=r"search point \{'model.n_heads': '5'\}: "):
        plan_search(directory, None, base, heads, 4)
    lr = parse_space([], ["optim.lr=loguniform:1e-4:1e-2"])
    for overrides, options, message in [
        (["train.eval_interval=0"], {}, "train.eval_interval = 0: the search feeds the pruner"),
        ([], {"metric": "val_accuracy"}, "logged by classifiers only"),
        ([], {"metric": "loss"}, "a metric logged at each evaluation"),
        ([], {"trials": 0}, "--trials = 0"),
        (["optim.min_lr=1e-3"], {}, r"search point \{'optim.lr': '0.0001'\}: optim.min_lr"),
    ]:
        options = {"trials": 4, **options}
        with pytest.raises(ConfigError, match=message):
            plan_search(directory, None, [*base, *overrides], lr, **options)
    assert not directory.exists()
    for args, message in [
        (["--grid=optim.lr=1,2", "--trials=3"], "--trials: only with --search optuna"),
        (["--search=optuna", "--grid=optim.lr=1,2"], "--search optuna needs --trials N"),
        (["--search=optuna", "--trials=2", "--random=2"], "--random is for --search grid"),
    ]:
        done = megagpt("launch", "sweep", f"--output-dir={directory}", *args, *base)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not directory.exists()


def report(hook, steps_and_values):
    """Feed a trial's hook one evaluation per (step, value); the last stop reason."""
    reason = None
    for step, value in steps_and_values:
        reason = hook(step, {"val_loss": value, "val_ppl": 2.0**value})
    return reason


def test_asha_prunes_a_trial_behind_at_its_rung_and_the_study_records_it(
    dataset_prefix, tokenizer, tmp_path
):
    base = search_overrides(dataset_prefix, tokenizer, tmp_path)
    space = parse_space([], ["optim.lr=loguniform:1e-4:1e-2"])
    search = plan_search(tmp_path / "search", None, base, space, trials=5, prune="asha")
    assert (search.min_resource, search.max_resource, search.direction) == (2, 6, "minimize")
    # Three trials that each beat the last at the first rung (step 2) go on to the end.
    for number, first in enumerate([5.0, 4.9, 4.8]):
        assert claim_trial(search, "worker") == number
        hook = PruningHook(search, number, 6)
        assert report(hook, [(2, first), (4, first - 1), (6, first - 2)]) is None
        outcome = finish_trial(search, number)
        assert (outcome.state, outcome.value, outcome.last_step) == ("COMPLETE", first - 2, 6)
    # A fourth far behind them at step 2 is pruned there: the hook's reason stops its run.
    assert claim_trial(search, "worker") == 3
    # (Had step 2 been its last, it would have finished: a trained trial completes.)
    assert PruningHook(search, 3, 2)(2, {"val_loss": 9.0}) is None
    reason = report(PruningHook(search, 3, 6), [(2, 9.0)])
    assert reason == "trial 3 pruned by the asha pruner at step 2 (val_loss 9.0000)"
    outcome = finish_trial(search, 3)
    assert (outcome.state, outcome.value, outcome.note) == ("PRUNED", 9.0, "pruned at step 2")
    trial_file = json.loads((search.trial_directory(3) / "trial.json").read_text())
    assert trial_file["state"] == "PRUNED" and trial_file["last_step"] == 2
    # A run that never logs the metric is a failed trial and a mistake worth stopping for.
    assert claim_trial(search, "worker") == 4
    assert PruningHook(search, 4, 6)(2, {"val_ppl": 3.0}) is None
    with pytest.raises(ConfigError, match=r"val_loss was not logged .*\(logged: val_ppl\)"):
        finish_trial(search, 4)
    assert claim_trial(search, "worker") is None  # all 5 trials asked
    states = [t.state.name for t in search.study().get_trials()]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "FAIL"]


def test_median_pruner_and_maximized_metrics(dataset_prefix, tokenizer, tmp_path):
    base = search_overrides(dataset_prefix, tokenizer, tmp_path)
    space = parse_space([], ["optim.lr=loguniform:1e-4:1e-2"])
    search = plan_search(
        tmp_path / "search", None, base, space, trials=7, prune="median", metric="val_ppl"
    )
    assert search.direction == "minimize"
    for number in range(5):  # MedianPruner waits for 5 finished trials
        claim_trial(search, "w")
        assert PruningHook(search, number, 6)(2, {"val_ppl": 10.0 + number}) is None
        finish_trial(search, number)
    claim_trial(search, "w")
    assert PruningHook(search, 5, 6)(2, {"val_ppl": 11.0}) is None  # better than the median 12
    assert claim_trial(search, "another worker") == 6
    assert "pruned by the median pruner" in PruningHook(search, 6, 6)(2, {"val_ppl": 13.0})
    accuracy = plan_search(
        tmp_path / "acc",
        None,
        [*base, "data.split=90,10,0"],
        space,
        trials=2,
        metric="eval/qa/acc",
        write=False,
    )
    assert accuracy.direction == "maximize"


def test_workers_share_the_journal_and_the_sampler_is_seeded(dataset_prefix, tokenizer, tmp_path):
    base = search_overrides(dataset_prefix, tokenizer, tmp_path)
    space = parse_space(["model.n_layers=1,2"], ["optim.lr=loguniform:1e-4:1e-2"])

    def asked(name, seed):
        search = plan_search(tmp_path / name, None, base, space, trials=4, seed=seed)
        numbers = [claim_trial(search, worker) for worker in ("a", "b", "a", "b")]
        # a worker that has not finished its trial gets it back (a requeued array task)
        assert numbers == [0, 1, 0, 1]
        for number in (0, 1):
            report(PruningHook(search, number, 6), [(2, 5.0 - number)])
            finish_trial(search, number)
        numbers += [claim_trial(search, w) for w in ("a", "b", "c")]
        assert numbers[4:] == [2, 3, None]  # never more than --trials, across workers
        return [t.params for t in search.study().get_trials()]

    first = asked("one", seed=3)
    assert asked("two", seed=3) == first
    assert asked("three", seed=4) != first
    assert len({t["optim.lr"] for t in first}) == 4  # no two workers draw the same


def test_a_local_search_prunes_and_reports_with_plots(dataset_prefix, tokenizer, tmp_path):
    base = search_overrides(dataset_prefix, tokenizer, tmp_path)
    directory = tmp_path / "search"
    # The learning rate spans 3.5 decades: 6 steps at 1e-5 learn next to nothing, at
    # 3e-2 a lot, so trials with small rates fall behind at the first rung (step 2).
    done = megagpt(
        "launch", "sweep", "--search=optuna", "--local", "--trials=5", "--prune=asha",
        f"--output-dir={directory}", "--sample=optim.lr=loguniform:1e-5:3e-2", *base,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "5 of 5 trials done" in done.stdout
    trials = Search.load(directory).study().get_trials()
    states = [t.state.name for t in trials]
    assert "PRUNED" in states and "COMPLETE" in states, states
    for trial in trials:
        run = directory / f"trial-{trial.number}"
        config = load_config(run / "config.yaml")
        assert config.optim.lr == trial.params["optim.lr"]  # the study's exact number
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        saved = json.loads((run / "trial.json").read_text())
        assert saved["state"] == trial.state.name
        if trial.state.name == "PRUNED":
            # stopped right after the evaluation that judged it, with a checkpoint there
            step = trial.user_attrs["pruned_at"]
            assert step < 6 and step % 2 == 0 and records[-1]["step"] == step
            assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
        else:
            assert records[-1]["step"] == 6
            assert trial.value == pytest.approx(records[-1]["val_loss"], abs=1e-6)

    shown = megagpt("sweep-report", str(directory))
    assert shown.returncode == 0, shown.stderr
    table, plots = shown.stdout.split("\n\n")
    header, *rows = table.splitlines()
    assert header.split() == ["rank", "trial", "optim.lr", "val_loss", "state", "step", "note"]
    complete = [r.split() for r in rows if "COMPLETE" in r]
    assert [r[0] for r in complete] == [str(i) for i in range(1, len(complete) + 1)]
    values = [float(r[3]) for r in complete]
    assert values == sorted(values)
    best = min(t.value for t in trials if t.value is not None and t.state.name == "COMPLETE")
    assert values[0] == pytest.approx(best, abs=1e-4)
    assert all(r.split()[0] == "-" for r in rows if "PRUNED" in r)
    for name in ("validation_curves.png", "best_so_far.png"):
        assert str(directory / name) in plots
        width, height = png_size(directory / name)
        assert width > 300 and height > 200

    pruned = next(t.number for t in trials if t.state.name == "PRUNED")
    finished = next(t.number for t in trials if t.state.name == "COMPLETE")
    runs = [str(directory / f"trial-{n}") for n in (finished, pruned)]
    compared = megagpt("compare", *runs, f"--plot={tmp_path / 'loss.png'}")
    assert compared.returncode == 0, compared.stderr
    header, first, second, _, plot_line = compared.stdout.splitlines()
    assert header.split()[:6] == ["run", "best_val_loss", "at_step", "final_val_loss", "steps"] + [
        "tokens"
    ]
    assert first.split()[4:6] == ["6", f"{6 * 8 * 32:,}"]
    assert second.split()[4] == str(trials[pruned].user_attrs["pruned_at"])
    assert plot_line == f"plot: {tmp_path / 'loss.png'}" and png_size(tmp_path / "loss.png")


def write_records(directory, records, config=None):
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (directory / "config.yaml").write_text(yaml.safe_dump(config))


def test_compare_reads_best_final_tokens_tasks_and_wall_time(tmp_path):
    config = {"train": {"global_batch_size": 4}, "data": {"seq_len": 16}}
    write_records(
        tmp_path / "a" / "run",
        [
            {"step": 1, "loss": 3.0, "elapsed_s": 10.0},
            {"step": 2, "loss": 2.5, "val_loss": 2.9, "eval/qa/acc": 0.25, "elapsed_s": 20.0},
            # a resumed run: elapsed_s starts again
            {"step": 3, "loss": 2.4, "elapsed_s": 5.0},
            {"step": 4, "loss": 2.0, "val_loss": 3.1, "eval/qa/acc": 0.5, "elapsed_s": 15.5},
        ],
        config,
    )
    write_records(tmp_path / "b" / "run", [{"step": 1, "loss": 4.0}])
    summaries = summarize_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    a, b = summaries
    assert (a.best_val_loss, a.best_step, a.final_val_loss) == (2.9, 2, 3.1)
    assert (a.tokens, a.wall_time_s, a.tasks) == (4 * 4 * 16, 35.5, {"eval/qa/acc": 0.5})
    assert a.name == str(tmp_path / "a" / "run")  # two runs called "run": their paths
    assert (b.best_val_loss, b.tokens, b.wall_time_s) == (None, None, None)
    header, first, second = format_comparison(summaries).splitlines()
    assert header.split() == [
        "run", "best_val_loss", "at_step", "final_val_loss", "steps", "tokens", "eval/qa/acc",
        "wall_time", "note",
    ]  # fmt: skip
    assert first.split()[1:] == ["2.9000", "2", "3.1000", "4", "256", "0.5000", "35.5s"]
    assert second.split()[1:] == ["-", "-", "-", "1", "-", "-", "-"]
    with pytest.raises(MissingFileError, match="no such run directory"):
        summarize_runs([tmp_path / "missing"])


def settled_history(run_file, rows: int) -> list[dict]:
    """wandb_history once it holds `rows` rows: W&B's service process can still be
    writing the file when run.finish() returns on a loaded machine (seen once in CI);
    waits up to a minute, then returns what there is."""
    deadline = time.monotonic() + 60
    while len(found := wandb_history(run_file)) < rows and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def wandb_history(run_file) -> list[dict]:
    """The history rows of a W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
    return rows


def test_wandb_offline_logs_every_metric_and_a_resume_continues_its_run(
    dataset_prefix, tokenizer, tmp_path, monkeypatch
):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = [
        *tiny_overrides(dataset_prefix, tokenizer, out),
        "logging.wandb=true",
        "logging.tensorboard=false",
    ]
    first = train(load_config(None, [*overrides, "train.max_steps=4"]))
    run_id = (out / "wandb" / "run_id").read_text().strip()
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    rows = settled_history(Path(run_file), 4)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows] == first.losses
    assert {r["_step"]: r["val_loss"] for r in rows if "val_loss" in r} == first.val_losses
    train(load_config(None, overrides))  # on to step 6, from the checkpoint of step 4
    assert (out / "wandb" / "run_id").read_text().strip() == run_id
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2  # one file per process, both of the same W&B run
    steps = {row["_step"] for row in wandb_history(Path(files[0]))}
    steps |= {row["_step"] for row in settled_history(Path(files[1]), 2)}
    assert steps == {1, 2, 3, 4, 5, 6}
    with pytest.raises(ConfigError, match="logging.wandb_project = ''"):
        load_config(None, ["logging.wandb=true", "logging.wandb_project="])


def test_trials_of_two_processes_prune_on_every_rank_and_match_one_process(
    dataset_prefix, tokenizer, tmp_path
):
    """--nproc 2: each trial is a torchrun job of 2 gloo ranks (data parallel); the
    hook on rank 0 prunes, every rank stops, and the values are one process's."""
    base = search_overrides(dataset_prefix, tokenizer, tmp_path)
    directory = tmp_path / "search"
    done = megagpt(
        "launch", "sweep", "--search=optuna", "--local", "--nproc=2", "--trials=2",
        f"--output-dir={directory}", "--sample=optim.lr=loguniform:1e-5:3e-2", *base,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "data parallel: 2 replicas" in done.stdout
    trials = Search.load(directory).study().get_trials()
    # seed 0 draws 8.1e-4, then 2.8e-4: the second is behind the first at step 2
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert "[rank1] WARNING" in done.stdout and "trial 1 pruned by the asha pruner" in done.stdout
    for trial in trials:
        lr = load_config(directory / f"trial-{trial.number}" / "config.yaml").optim.lr
        last = max(trial.intermediate_values)
        # up to the trial's last evaluation; the warmup (2 steps) is the same either way
        alone = train(
            load_config(
                None,
                [*base, f"optim.lr={override_value(lr)}", f"train.max_steps={last}",
                 f"train.output_dir={tmp_path / f'alone-{trial.number}'}"],
            )
        )  # fmt: skip
        for step, value in trial.intermediate_values.items():
            assert value == pytest.approx(alone.val_losses[step], abs=1e-5)
