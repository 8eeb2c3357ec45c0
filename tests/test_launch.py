"""Launchers without a cluster: node lists, rendezvous from SLURM_* variables, the
rendered sbatch script, torchrun on this machine, and the errors for bad options."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from megagpt.config import ConfigError
from megagpt.launch.agent import child_pids, failure_exit_code
from megagpt.launch.environment import launch_environment
from megagpt.launch.errors import LaunchError
from megagpt.launch.rendezvous import (
    HostlistError,
    expand_hostlist,
    rendezvous_port,
    slurm_rendezvous,
    task_rank_environment,
)
from megagpt.launch.slurm import SlurmJob, fill_template, render_script, time_limit_seconds
from megagpt.parallel.env import collective_timeout_s
from tests.conftest import tiny_overrides
from tests.test_cli import megagpt


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("node-[1-3],login5", ["node-1", "node-2", "node-3", "login5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-g[1,3]", ["r1-g1", "r1-g3", "r2-g1", "r2-g3"]),
        ("a[1-2]b", ["a1b", "a2b"]),
        ("solo", ["solo"]),
    ],
)
def test_hostlists_expand_in_scontrol_order(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-", "gpu]1[", "gpu[a-b]", "gpu[4-1]", "a,,b", "x[1-2"])
def test_malformed_hostlists_are_errors(bad):
    with pytest.raises(HostlistError, match=re.escape(repr(bad))):
        expand_hostlist(bad)


def test_rendezvous_port_is_per_job_and_below_the_ephemeral_range():
    ports = {rendezvous_port(job) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(15000 <= p < 30000 for p in ports)
    assert rendezvous_port("123456") == rendezvous_port(123456)


SLURM_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[01-04,07]",
    "SLURM_NODEID": "3",
    "SLURM_NTASKS": "40",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_PROCID": "29",
    "SLURM_LOCALID": "5",
}


def test_rendezvous_from_slurm_variables_uses_the_first_node():
    rendezvous = slurm_rendezvous(SLURM_JOB)
    assert rendezvous.nodes == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
    assert rendezvous.endpoint == f"gpu01:{rendezvous_port(4242)}"
    assert rendezvous.node_rank == 3
    assert slurm_rendezvous(SLURM_JOB, port=29400).endpoint == "gpu01:29400"
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST not set"):
        slurm_rendezvous({"SLURM_JOB_ID": "1"})


def test_one_task_per_rank_reads_slurm_procid_but_not_under_torchrun():
    env = task_rank_environment(SLURM_JOB)
    assert env == {
        "RANK": "29",
        "WORLD_SIZE": "40",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu01",
        "MASTER_PORT": str(rendezvous_port(4242)),
    }
    # torchrun's workers all inherit their node task's SLURM_PROCID; RANK is what counts
    under_torchrun = {**SLURM_JOB, "SLURM_PROCID": "0", "RANK": "13", "TORCHELASTIC_RUN_ID": "x"}
    assert task_rank_environment(under_torchrun) == {}


def test_launch_environment_fills_defaults_and_keeps_what_the_user_set():
    env = launch_environment(4, {"PATH": "/bin", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, cpus=16)
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert collective_timeout_s(env) == 600
    assert launch_environment(8, {}, cpus=4, collective_timeout_s=90)["OMP_NUM_THREADS"] == "1"
    assert collective_timeout_s(launch_environment(1, {}, collective_timeout_s=90)) == 90
    with pytest.raises(ConfigError, match="MEGAGPT_COLLECTIVE_TIMEOUT_S = 'soon'"):
        collective_timeout_s({"MEGAGPT_COLLECTIVE_TIMEOUT_S": "soon"})


def test_worker_exit_codes_survive_the_agent():
    def failure(rank, code, timestamp):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")
        f.timestamp = timestamp
        return f

    # the checkpointed stop, not the SIGTERM the agent then sent to the other rank
    assert failure_exit_code({0: failure(0, -15, 5), 1: failure(1, 75, 5)}) == 75
    assert failure_exit_code({0: failure(0, 76, 4), 1: failure(1, 75, 5)}) == 76
    assert failure_exit_code({0: failure(0, -9, 5)}) == 137


def test_child_pids_finds_a_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_time_limits_in_every_slurm_format():
    assert [
        time_limit_seconds(t) for t in ("90", "5:30", "4:00:00", "2-0", "1-2:30", "1-0:0:10")
    ] == [
        5400,
        330,
        14400,
        172800,
        95400,
        86410,
    ]


def render(tmp_path, **options) -> str:
    command = ["-m", "megagpt", "train", "--config", "gpt2-124m", "data.path=my data's/x"]
    return render_script(SlurmJob(command=command, output_dir=tmp_path / "out", **options))


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_rendered_script_for_a_multi_node_gpu_job(tmp_path):
    script = render(
        tmp_path,
        nodes=4,
        gpus_per_node=8,
        time="2-00:00:00",
        signal_lead_s=600,
        max_restarts=5,
        partition="gpu",
        account="proj1",
        exclusive=True,
        sbatch_args=["--mail-type=END"],
    )
    options = sbatch_options(script)
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=1",  # one torchrun per node
        "--gpus-per-node=8",
        "--cpus-per-task=8",
        "--time=2-00:00:00",
        "--signal=B:USR1@600",
        "--requeue",
        "--open-mode=append",
        "--partition=gpu",
        "--account=proj1",
        "--exclusive",
        "--mail-type=END",
        f"--output={tmp_path.resolve() / 'out' / 'slurm' / '%j.log'}",
    ):
        assert expected in options
    assert "max_restarts=5" in script and "requeue_exit_code=75" in script
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in script
    start = script.index("\nsrun ") + 1  # the command line, not a comment naming srun
    srun = script[start : script.index(" &\n", start)].replace("\\\n", " ")
    words = shlex.split(srun)
    assert words[: words.index("--")][-2:] == ["--nproc-per-node", "8"]
    # the overrides come back exactly, spaces and quotes included
    assert words[words.index("--") + 1 :][-1] == "data.path=my data's/x"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_rendered_script_for_one_task_per_rank_on_cpu(tmp_path):
    script = render(tmp_path, nproc_per_node=4, rendezvous="srun", port=29400, array="0-3%2")
    options = sbatch_options(script)
    assert "--ntasks-per-node=4" in options and "--cpus-per-task=1" in options
    assert "--array=0-3%2" in options and not any("gpus" in o for o in options)
    assert any(o.endswith("/slurm/%A_%a.log") for o in options)
    assert "megagpt.launch.slurm_task --per-task --port 29400 --" in script


@pytest.mark.parametrize(
    "options, message",
    [
        ({"nodes": 0}, "--nodes = 0: must be 1 or more"),
        ({"gpus_per_node": 8, "nproc_per_node": 4}, "one process per GPU"),
        ({"time": "10", "signal_lead_s": 600}, "--signal-lead = 600 s is not shorter"),
        ({"time": "ten minutes"}, "--time = 'ten minutes'"),
        ({"partition": "gpu\n#SBATCH --x"}, "--partition = 'gpu\\n#SBATCH --x'"),
        ({"job_name": "my job"}, "--job-name = 'my job'"),
        ({"sbatch_args": ["mail-type=END"]}, "--sbatch-arg 'mail-type=END'"),
    ],
)
def test_bad_job_options_are_named(tmp_path, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render(tmp_path, **options)


def test_template_placeholders_must_be_known():
    with pytest.raises(ConfigError, match="unknown placeholders nodez"):
        fill_template("#SBATCH --nodes={{nodez}}", {"nodes": "2"}, "my.template")


def test_launch_slurm_dry_run_prints_the_script_and_checks_the_config(tmp_path):
    done = megagpt(
        "launch",
        "slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--dry-run",
        "--config",
        "gpt2-124m",
        f"train.output_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout and "--config gpt2-124m" in done.stdout
    assert not (tmp_path / "slurm").exists()  # nothing written
    bad = megagpt("launch", "slurm", "--nodes", "0", "--dry-run", cwd=tmp_path)
    assert bad.returncode == 2 and "--nodes = 0: must be 1 or more" in bad.stderr
    typo = megagpt("launch", "slurm", "--dry-run", "optim.lrr=1", cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean optim.lr" in typo.stderr


def test_launch_slurm_without_sbatch_says_what_to_do(tmp_path):
    env_path = {"PATH": str(tmp_path)}  # no sbatch on it
    done = subprocess.run(
        [sys.executable, "-m", "megagpt", "launch", "slurm", f"train.output_dir={tmp_path}"],
        env={**os.environ, **env_path},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "sbatch not found" in done.stderr


def test_launch_local_trains_on_two_processes(dataset_prefix, tokenizer, tmp_path):
    out = tmp_path / "run"
    done = megagpt(
        "launch", "local", "--nproc", "2", *tiny_overrides(dataset_prefix, tokenizer, out)
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "data parallel: 2 replicas" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    two_nodes = megagpt("launch", "local", "--nnodes", "2", f"train.output_dir={tmp_path}")
    assert two_nodes.returncode == 2 and "needs --rdzv-endpoint" in two_nodes.stderr
    none = megagpt("launch", "local", "--nproc", "0", f"train.output_dir={tmp_path}")
    assert none.returncode == 2 and "--nproc = 0: must be 1 or more" in none.stderr


def test_torchrun_script_passes_its_arguments_on(tmp_path):
    launcher = Path(__file__).resolve().parents[1] / "launch" / "torchrun.sh"
    done = subprocess.run(
        ["bash", str(launcher), "2", "model.n_heads=5", f"train.output_dir={tmp_path}"],
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "model.n_heads = 5: must divide" in done.stderr


def test_preprocess_array_scripts_chain_the_phases(tmp_path, tokenizer, capsys):
    from megagpt.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one document"}\n')
    base = ["launch", "preprocess", "--array", "3", "--cpus-per-task", "4", "--dry-run", "--"]
    data = [str(corpus), "--tokenizer", str(tokenizer.path), "--output-prefix", "out/web"]
    assert main([*base, *data, "--near-dedup"]) == 0
    scripts = capsys.readouterr().out.split("#!/bin/bash")[1:]
    phases = [re.search(r"--phase (\w+)", s).group(1) for s in scripts]
    assert phases == ["scan", "dedup", "tokenize"]
    assert "#SBATCH --array=0-2" in scripts[0] and "#SBATCH --array" not in scripts[1]
    assert "#SBATCH --dependency=afterok:<scan job id>" in scripts[1]
    assert "#SBATCH --dependency=afterok:<dedup job id>" in scripts[2]
    for script in scripts:
        command = shlex.split(script.split("PYTHONUNBUFFERED=1\n")[1].splitlines()[0])
        assert command[1:3] == ["-m", "data_tools.preprocess"]
        assert command[command.index("--workers") + 1] == "4"
        assert command[command.index("--num-tasks") + 1] == "3"
    assert main([*base, *data, "--no-dedup"]) == 0  # nothing to deduplicate: one array
    assert capsys.readouterr().out.count("#!/bin/bash") == 1
    assert main([*base, *data, "--phase", "scan"]) == 2
    assert "sets --num-tasks, --task-index and --phase itself" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "missing.jsonl"), *data[1:]]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
