"""A private single-node SLURM cluster for tests: munged, slurmctld and slurmd as child
processes of the test session, with every file under one temporary directory.

    cluster = SlurmCluster.start()      # needs root and Debian's slurmctld, slurmd, munge
    cluster.run("sbatch", "--wrap", "true")
    cluster.stop()                      # cancels jobs, then stops the daemons by pid

Commands given to `run` (or any subprocess started with `cluster.env`) talk to this
cluster through SLURM_CONF; nothing in /etc is used or changed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.testing import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
# A requeued job starts again only after the credential lifetime (+1 s); SLURM's default
# of 120 s would make every requeue test wait two minutes. 5 s is the least it accepts.
CREDENTIAL_LIFETIME_S = 5


def missing_requirements() -> str | None:
    """Why a cluster cannot start on this machine, or None when it can."""
    absent = [name for name in (*DAEMONS, "sbatch", "scontrol") if not _which(name)]
    if absent:
        return (
            f"SLURM test cluster needs {', '.join(absent)} "
            "(apt-get install slurmctld slurmd slurm-client munge; .ci/run does this)"
        )
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd runs jobs as their submitting user)"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return kb // 1024


@dataclass
class SlurmCluster:
    root: Path
    node_name: str
    cpus: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, timeout_s: float = 60.0) -> SlurmCluster:
        root = Path(tempfile.mkdtemp(prefix="megagpt-slurm-"))
        root.chmod(0o755)  # munged (as the munge user) must reach its socket directory
        # The node is called by a name every process here resolves: rendezvous endpoints
        # are built from SLURM_JOB_NODELIST.
        node_name = "localhost"
        cpus = os.cpu_count() or 1
        env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        cluster = cls(root, node_name, cpus, env)
        try:
            cluster._start_munge()
            cluster._write_config()
            cluster._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            cluster._spawn("slurmd", ["slurmd", "-D", "-N", node_name])
            cluster._wait_until_idle(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        directory = self.root / "munge"
        directory.mkdir(mode=0o755)
        os.chown(directory, munge.pw_uid, munge.pw_gid)
        key = directory / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self.socket = directory / "munge.socket.2"
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",  # the temp dir's parent (/tmp) is world-writable
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={directory / 'munged.pid'}",
                f"--log-file={directory / 'munged.log'}",
                f"--seed-file={directory / 'munged.seed'}",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
        )
        _wait_for(lambda: self.socket.exists(), 10, "munged to create its socket")

    def _write_config(self) -> None:
        for name in ("state", "spool"):
            (self.root / name).mkdir()
        memory = int(_memory_mb() * 0.9)
        lines = [
            "ClusterName=megagpt-test",
            f"SlurmctldHost={self.node_name}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire={CREDENTIAL_LIFETIME_S}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # look at pending jobs every second, so a requeued job starts as soon as its
            # credential lifetime has passed (the default passes come every 30-60 s)
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=10",
            "MinJobAge=600",
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={memory} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        (self.root / "slurm.conf").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, command: list[str], **kwargs) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self.processes[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, **kwargs
        )
        log.close()

    def _wait_until_idle(self, timeout_s: float) -> None:
        def node_idle() -> bool:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.daemon_logs()}")
            done = self.run("sinfo", "--noheader", "--format=%t", check=False)
            return done.returncode == 0 and done.stdout.strip() == "idle"

        _wait_for(node_idle, timeout_s, f"the node to become idle\n{self.daemon_logs()}")

    def run(self, *command: str, check: bool = True, timeout: float = 60):
        """Run a SLURM client command against this cluster; return the CompletedProcess."""
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
        return done

    def daemon_logs(self, tail: int = 3000) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (newest first) by pid."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--signal=KILL", "--user=root", check=False)
            self.run("scancel", "--user=root", check=False)
            _wait_for(self._no_jobs, 30, "jobs to end", raise_on_timeout=False)
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def _no_jobs(self) -> bool:
        done = self.run("squeue", "--noheader", "--format=%i", check=False)
        return done.returncode == 0 and not done.stdout.strip()


def _wait_for(condition, timeout_s: float, what: str, raise_on_timeout: bool = True) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    if raise_on_timeout:
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
    return False


def resolvable(host: str) -> bool:
    try:
        socket.gethostbyname(host)
    except OSError:
        return False
    return True
