"""Run torchrun's agent in this process, so a node's processes can stop cleanly.

Plain `torchrun` has two habits that break preemption: SIGUSR1 kills it (Python's
default action), and when a worker fails it exits 1, losing the worker's exit code.
Here the agent runs under handlers that pass SIGUSR1/SIGTERM on to the workers (which
checkpoint and exit with REQUEUE_EXIT_CODE), and the workers' own exit code becomes
this process's, so the sbatch script can tell "checkpointed, requeue me" from a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from megagpt.contract import STOP_SIGNALS
from megagpt.launch.errors import LaunchError

# torchrun's agent turns SIGTERM into "kill every worker within 30 s" unless told to
# leave it alone; the workers get SIGTERM from SLURM themselves and need the time.
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def torchrun_arguments(
    nproc_per_node: int,
    command: Sequence[str],
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "megagpt",
) -> list[str]:
    """torchrun's command line: `command` is what follows `python` for each worker
    (`-m megagpt train ...` or `script.py ...`). No endpoint on one node: the store
    then binds a port the OS picks, so jobs sharing a machine never collide."""
    if nnodes > 1 and not rdzv_endpoint:
        raise LaunchError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every node "
            "(HOST: the first node, PORT: free on it, e.g. 29400)"
        )
    if rdzv_endpoint is None:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        rendezvous.append(f"--rdzv-id={rdzv_id}")
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        *rendezvous,
        "--max-restarts=0",
        *command,
    ]


def run_agent(arguments: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run torchrun with `arguments` under `environ`; return the exit code to report.

    0 when every worker succeeded; otherwise the exit code of the first worker that
    failed with one (REQUEUE_EXIT_CODE after a checkpointed stop), or 128 + signal
    when workers were only killed. Meant for a process that exits afterwards: it
    leaves SIGUSR1 and SIGTERM ignored.
    """
    # Handlers first: a stop signal during the slow torch import must not end the agent.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _forward_to_children)
    os.environ.update(environ)  # the workers inherit the agent's environment
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        parsed = parse_args(list(arguments))
        parsed.signals_to_handle = AGENT_SIGNALS
        run(parsed)
    except ChildFailedError as error:
        return failure_exit_code(error.failures)
    finally:
        # Not the previous handlers: late copies of a stop signal must not kill this
        # process (Python's default for SIGUSR1) before it reports the exit code.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    return 0


def failure_exit_code(failures: Mapping[int, object]) -> int:
    """The exit code that stands for a set of torchrun worker failures (by global rank):
    the earliest positive one, else 128 + the signal that killed the earliest."""
    ordered = sorted(failures.values(), key=lambda f: (f.timestamp, f.local_rank))
    for failure in ordered:
        if failure.exitcode > 0:
            return failure.exitcode
    return 128 - ordered[0].exitcode


def _forward_to_children(signum: int, frame: FrameType | None) -> None:
    # SLURM signals every process of a step itself; this covers signals sent to the
    # agent alone (kill PID, or a scheduler that only signals the task's first process).
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signum)


def child_pids(parent: int) -> list[int]:
    """Process ids whose parent is `parent` (read from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children
