"""Real jobs on a private single-node SLURM cluster (tests/slurm_cluster.py): training
submitted with `megagpt launch slurm`, a sweep as a job array, and the sbatch script's
preemption path (signal forwarding, requeue, appended logs, --max-restarts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megagpt.launch.rendezvous import expand_hostlist
from megagpt.launch.search import Search
from megagpt.launch.slurm import SlurmJob, submit_job
from tests.conftest import tiny_overrides
from tests.slurm_cluster import SlurmCluster, missing_requirements
from tests.test_near_dedup import job_outputs

STANDIN = Path(__file__).with_name("preemption_standin.py")


@pytest.fixture(scope="module")
def cluster():
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]  # for submit_job's sbatch
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()


def job_field(cluster: SlurmCluster, job_id: str, name: str) -> str:
    shown = cluster.run("scontrol", "show", "job", job_id).stdout
    return re.search(rf"\b{name}=(\S+)", shown).group(1)


def wait_for_job(cluster: SlurmCluster, job_id: str, timeout_s: float = 120) -> str:
    """Wait until the job (every task of an array) has ended; return its final state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queued = cluster.run("squeue", "--noheader", "--format=%i", f"--jobs={job_id}").stdout
        if not queued.strip():
            return job_field(cluster, job_id, "JobState")
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still queued after {timeout_s:.0f}s\n{cluster.daemon_logs()}")


def wait_for_file(path: Path, cluster: SlurmCluster, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no log)"
            raise TimeoutError(f"{path} did not appear in {timeout_s:.0f}s; log:\n{text}")
        time.sleep(0.2)


def wait_for_restart(
    cluster: SlurmCluster, job_id: str, restarts: int, *updates: str, timeout_s: float = 90
) -> None:
    """Wait until the job runs its restart number `restarts`, applying `updates` (scontrol
    Key=Value) while it waits. SLURM holds a requeued job for the credential lifetime; a
    job forced to start sooner (StartTime=now) can be killed as "credential revoked"."""
    deadline = time.monotonic() + timeout_s
    updated = False
    while time.monotonic() < deadline:
        shown = cluster.run("scontrol", "show", "job", job_id).stdout
        state = re.search(r"JobState=(\S+)", shown)[1]
        if int(re.search(r"Restarts=(\d+)", shown)[1]) >= restarts:
            if state == "RUNNING":
                return
            if state == "PENDING" and updates and not updated:
                cluster.run("scontrol", "update", f"jobid={job_id}", *updates)
                updated = True
        time.sleep(0.5)
    raise TimeoutError(
        f"job {job_id} did not run its restart {restarts} within {timeout_s:.0f}s:\n"
        f"{shown}\n{cluster.daemon_logs()}"
    )


def megagpt(cluster: SlurmCluster, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megagpt", *args],
        env=cluster.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hostlist_parser_agrees_with_scontrol(cluster):
    for hostlist in ("gpu[01-04,07]", "node-[1-3],login5", "rack[1-2]-gpu[08-11]", "n[1,01]"):
        expected = cluster.run("scontrol", "show", "hostnames", hostlist).stdout.split()
        assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("rendezvous", ["torchrun", "srun"])
def test_two_process_cpu_training_job(cluster, dataset_prefix, tokenizer, tmp_path, rendezvous):
    out = tmp_path / "run"
    done = megagpt(
        cluster,
        "launch",
        "slurm",
        "--nproc-per-node=2",
        f"--rendezvous={rendezvous}",
        "--time=10",
        *tiny_overrides(dataset_prefix, tokenizer, out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted job (\d+)", done.stdout).group(1)
    log = out / "slurm" / f"{job_id}.log"
    assert f"log: {log}" in done.stdout
    assert wait_for_job(cluster, job_id) == "COMPLETED", log.read_text()
    text = log.read_text()
    assert "training exited with status 0" in text
    if rendezvous == "torchrun":
        assert "--nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=localhost:" in text
    else:
        assert "rank 0 of 2" in text and "rank 1 of 2" in text
    assert "data parallel: 2 replicas" in text
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and '"val_loss"' in steps[-1]
    assert (out / "checkpoints" / "step_00000006").is_dir()


def test_sweep_as_a_job_array_and_its_report(cluster, dataset_prefix, tokenizer, tmp_path):
    sweep_dir = tmp_path / "sweep"
    base = [o for o in tiny_overrides(dataset_prefix, tokenizer, tmp_path) if "output_dir" not in o]
    done = megagpt(
        cluster,
        "launch",
        "sweep",
        f"--output-dir={sweep_dir}",
        "--grid=optim.lr=1e-3,1e-2",
        "--grid=model.n_layers=1,2",
        "--time=10",
        *base,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted job array (\d+) \(4 runs\)", done.stdout).group(1)
    wait_for_job(cluster, job_id)
    for index in range(4):
        state = job_field(cluster, f"{job_id}_{index}", "JobState")
        assert state == "COMPLETED", (sweep_dir / "slurm" / f"{job_id}_{index}.log").read_text()
    report = megagpt(cluster, "sweep-report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    header, *rows = report.stdout.split("\n\n")[0].splitlines()
    assert header.split() == [
        "rank",
        "run",
        "optim.lr",
        "model.n_layers",
        "val_loss",
        "step",
        "note",
    ]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4"]
    losses = [float(row.split()[4]) for row in rows]
    assert losses == sorted(losses) and len(set(losses)) == 4
    points = {tuple(row.split()[2:4]) for row in rows}
    assert points == {(lr, n) for lr in ("1e-3", "1e-2") for n in ("1", "2")}
    for row in rows:
        last = json.loads(
            (sweep_dir / row.split()[1] / "metrics.jsonl").read_text().splitlines()[-1]
        )
        assert f"{last['val_loss']:.4f}" == row.split()[4]


def test_optuna_search_as_a_job_array_prunes_and_its_best_trial_reruns_alone(
    cluster, dataset_prefix, tokenizer, tmp_path
):
    """8 tiny trials, 2 array tasks sharing the study's journal file; ASHA at evaluations
    every 2 steps. The learning rate spans 3.5 decades, so trials with small rates fall
    behind at the first rung and are pruned. The best trial's config.yaml, trained
    again alone, gives its validation loss again."""
    sweep_dir = tmp_path / "search"
    base = [o for o in tiny_overrides(dataset_prefix, tokenizer, tmp_path) if "output_dir" not in o]
    base += ["train.max_steps=6", "train.eval_interval=2", "optim.min_lr=0"]
    base += ["logging.tensorboard=false"]
    done = megagpt(
        cluster, "launch", "sweep", "--search=optuna", "--trials=8", "--prune=asha",
        "--max-parallel=2", f"--output-dir={sweep_dir}", "--time=10",
        "--sample=optim.lr=loguniform:1e-5:3e-2", *base, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted job array (\d+) \(2 workers, 8 trials\)", done.stdout)[1]
    wait_for_job(cluster, job_id, timeout_s=300)
    logs = {i: sweep_dir / "slurm" / f"{job_id}_{i}.log" for i in range(2)}
    for index, log in logs.items():
        assert job_field(cluster, f"{job_id}_{index}", "JobState") == "COMPLETED", log.read_text()
    report = megagpt(cluster, "sweep-report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    header, *rows = report.stdout.split("\n\n")[0].splitlines()
    assert header.split() == ["rank", "trial", "optim.lr", "val_loss", "state", "step", "note"]
    states = [row.split()[4] for row in rows]
    assert len(rows) == 8 and "PRUNED" in states and "COMPLETE" in states, report.stdout
    assert set(states) <= {"COMPLETE", "PRUNED"}, report.stdout
    for row in rows:
        trial = sweep_dir / row.split()[1]
        steps = metric_steps(trial / "metrics.jsonl")
        if row.split()[4] == "PRUNED":  # stopped at the evaluation that judged it
            assert max(steps) == int(row.split()[5]) < 6 and "pruned at step" in row
        else:
            assert max(steps) == 6
    # both array tasks trained trials of the one study: they shared its journal file
    workers = {t.user_attrs["worker"] for t in Search.load(sweep_dir).study().get_trials()}
    assert workers == {f"slurm-{job_id}_0", f"slurm-{job_id}_1"}
    best = rows[0].split()
    assert best[0] == "1" and best[4] == "COMPLETE"
    rerun = subprocess.run(
        [sys.executable, "-m", "megagpt", "train", "--config",
         str(sweep_dir / best[1] / "config.yaml"), f"train.output_dir={tmp_path / 'rerun'}"],
        env={**cluster.env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    last = json.loads((tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines()[-1])
    trial_last = json.loads((sweep_dir / best[1] / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6 and last["val_loss"] == pytest.approx(float(best[3]), abs=1e-4)
    assert last["val_loss"] == pytest.approx(trial_last["val_loss"], abs=1e-6)


def standin_job(state_dir: Path, max_restarts: int, time_limit: str, lead_s: int, *args: str):
    return SlurmJob(
        command=[str(STANDIN), str(state_dir), *args],
        output_dir=state_dir,
        nproc_per_node=2,
        time=time_limit,
        signal_lead_s=lead_s,
        max_restarts=max_restarts,
        job_name="standin",
    )


def standin_lines(log: Path, rank: int = 0) -> list[str]:
    return [line for line in log.read_text().splitlines() if f"standin: rank {rank} " in line]


def test_time_limit_warning_checkpoints_and_requeues(cluster, tmp_path):
    # --time 1 minute with a 40 s lead: SLURM sends SIGUSR1 to the batch shell at its first
    # time-limit check after 20 s (it checks every 30 s), when the ranks have started.
    job = standin_job(tmp_path, 1, "1", 40, "--finish-from-restart=1")
    job_id, log = submit_job(job)
    wait_for_file(tmp_path / "ready-0", cluster, log)
    # the restarted run would get the same warning: give it room to finish
    wait_for_restart(cluster, job_id, 1, "TimeLimit=10")
    assert wait_for_job(cluster, job_id) == "COMPLETED", log.read_text()
    text = log.read_text()
    assert "SIGUSR1 at" in text  # the batch shell got the warning ...
    stopped = re.search(r"rank 0 restart 0 stops at step (\d+) \(this rank got SIGUSR1\)", text)
    assert stopped, text  # ... and the training processes did
    step = int(stopped[1])
    assert f"rank 0 restart 1 resumes at step {step}" in text
    assert f"rank 0 restart 1 finished at step {step + 3}" in text
    assert "requeueing (restart 1 of 1)" in text
    # one log across both runs, in order
    assert text.index("(restart 0, at most 1)") < text.index("(restart 1, at most 1)")
    assert job_field(cluster, job_id, "Restarts") == "1"


def test_a_stop_signal_while_training_starts_is_repeated_until_it_arrives(cluster, tmp_path):
    # Sent when the torchrun agent is up but has no workers to pass it to yet (as a
    # time-limit warning or preemption may come): the batch shell repeats it every 10 s.
    job_id, log = submit_job(standin_job(tmp_path, 0, "10", 60, "--max-seconds=40"))
    deadline = time.monotonic() + 60
    while not (log.exists() and "node 0 of 1: torchrun" in log.read_text()):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.05)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    assert not (tmp_path / "ready-0").exists()  # the workers were still starting
    wait_for_job(cluster, job_id)
    text = log.read_text()
    assert re.search(r"rank 0 restart 0 stops at step \d+ \(this rank got SIGUSR1\)", text), text
    assert "training exited with status 75" in text


def test_scancel_signals_requeue_until_max_restarts(cluster, tmp_path):
    job_id, log = submit_job(standin_job(tmp_path, 3, "10", 60))
    ways = [
        ("--batch", "--signal=USR1"),  # the batch shell only: it forwards to the step
        ("--full", "--signal=USR1"),  # batch shell and every task
        ("--signal=TERM",),  # the tasks only, as a preemption would
    ]
    for restart, way in enumerate(ways):
        wait_for_file(tmp_path / f"ready-{restart}", cluster, log)
        cluster.run("scancel", *way, job_id)
        wait_for_restart(cluster, job_id, restart + 1)
    wait_for_file(tmp_path / "ready-3", cluster, log)
    cluster.run("scancel", job_id)  # cancel: SIGTERM, then SIGKILL after KillWait
    assert wait_for_job(cluster, job_id) == "CANCELLED"
    text = log.read_text()
    # a cancel sends SIGTERM to every process, and the batch shell forwards it as SIGUSR1
    expected_signals = ["SIGUSR1", "SIGUSR1", "SIGTERM", "SIG"]
    stopped_at = 0
    for restart, signal_name in enumerate(expected_signals):
        lines = [line for line in standin_lines(log) if f"restart {restart} " in line]
        assert f"resumes at step {stopped_at}" in lines[0], text  # from the "checkpoint"
        assert f"(this rank got {signal_name}" in lines[1], text
        stopped_at = int(re.search(r"stops at step (\d+)", lines[1])[1])
    for restart in (1, 2, 3):
        assert f"requeueing (restart {restart} of 3)" in text
        assert f"(restart {restart}, at most 3)" in text
    assert "not requeueing: 3 restarts reached --max-restarts 3" in text
    assert job_field(cluster, job_id, "Restarts") == "3"


def metric_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(path: Path, beyond: int, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metric_steps(path) and max(metric_steps(path)) > beyond):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no step past {beyond} in {path}; log:\n{log.read_text()}")
        time.sleep(0.2)


def test_stopped_training_requeues_and_finishes_like_an_uninterrupted_run(
    cluster, dataset_prefix, tokenizer, tmp_path
):
    """The real trainer: SIGUSR1 to the batch shell (how the time-limit warning arrives)
    and then a SIGTERM to the tasks (a preemption) each make it finish its step, save,
    exit 75 and requeue; the third run finishes. Every step's loss equals that of an
    uninterrupted run of the same layout."""
    settings = [
        "train.max_steps=40",
        "train.eval_interval=40",
        "logging.tensorboard=false",
        "model.n_layers=4",
        "model.hidden_size=128",
        "train.global_batch_size=16",
    ]
    reference = megagpt(
        cluster,
        "launch",
        "local",
        "--nproc=2",
        *tiny_overrides(dataset_prefix, tokenizer, tmp_path / "whole"),
        *settings,
        cwd=tmp_path,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "stopped"
    done = megagpt(
        cluster,
        "launch",
        "slurm",
        "--nproc-per-node=2",
        "--time=10",
        "--max-restarts=2",
        *tiny_overrides(dataset_prefix, tokenizer, out),
        *settings,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted job (\d+)", done.stdout).group(1)
    log = out / "slurm" / f"{job_id}.log"
    metrics = out / "metrics.jsonl"
    wait_for_step(metrics, 5, log)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for_restart(cluster, job_id, 1)
    first_stop = max(metric_steps(metrics))
    wait_for_step(metrics, first_stop + 3, log)
    cluster.run("scancel", "--signal=TERM", job_id)
    wait_for_restart(cluster, job_id, 2)
    assert wait_for_job(cluster, job_id, timeout_s=180) == "COMPLETED", log.read_text()
    text = log.read_text()
    stops = [
        line
        for line in text.splitlines()
        if "[rank0]" in line and "stopped on request after saving a checkpoint" in line
    ]
    assert len(stops) == 2, text
    assert text.count("resumed from") == 2 and "requeueing (restart 2 of 2)" in text
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").open()]
    stopped = [json.loads(x) for x in metrics.open()]
    assert [r["step"] for r in stopped] == list(range(1, 41))  # each step once
    assert [r["loss"] for r in stopped] == [r["loss"] for r in whole]
    assert stopped[-1]["val_loss"] == whole[-1]["val_loss"]


def test_preprocess_array_with_near_dedup_equals_one_process(
    cluster, documents, tokenizer, tmp_path
):
    """`megagpt launch preprocess --array 4`: scan array, dedup, tokenize array, chained by
    SLURM dependencies, keep the documents one process keeps, token for token."""
    texts = list(dict.fromkeys(documents))[:240]
    corpus = []
    for i, text in enumerate(texts):
        corpus.append(text)
        if i % 3 == 0:
            corpus.append(f"{text} (edited)")  # a near duplicate
        if i % 4 == 0:
            corpus.append(text)  # an exact one
    inputs = []
    for k in range(6):
        path = tmp_path / f"part{k}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[k::6]))
        inputs.append(str(path))
    arguments = [*inputs, "--tokenizer", str(tokenizer.path), "--near-dedup"]
    one = [sys.executable, "-m", "data_tools.preprocess", *arguments, "--workers", "2"]
    subprocess.run([*one, "--output-prefix", str(tmp_path / "one/c")], check=True,
                   capture_output=True)  # fmt: skip
    done = megagpt(cluster, "launch", "preprocess", "--array", "4", "--time", "10", "--",
                   *arguments, "--output-prefix", "array/c", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    jobs = dict(re.findall(r"submitted (\w+) as job (\d+)", done.stdout))
    assert list(jobs) == ["scan", "dedup", "tokenize"]
    assert job_field(cluster, jobs["dedup"], "Dependency").startswith(f"afterok:{jobs['scan']}_*")
    wait_for_job(cluster, jobs["tokenize"], timeout_s=300)
    logs = tmp_path / "array/c.job/slurm"
    for phase, job_id in jobs.items():
        tasks = [job_id] if phase == "dedup" else [f"{job_id}_{i}" for i in range(4)]
        for task in tasks:
            state = job_field(cluster, task, "JobState")
            assert state == "COMPLETED", "\n".join(p.read_text() for p in logs.glob("*.log"))
    assert job_outputs(tmp_path / "array/c") == job_outputs(tmp_path / "one/c")
    summary = json.loads((tmp_path / "array/c.summary.json").read_text())
    assert summary["drops"] == {"duplicate": 60, "near_duplicate": 80}
