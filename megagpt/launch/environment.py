"""Environment defaults for training processes, each overridable by setting it first.

Used by every launcher (`megagpt launch local`, the SLURM task), so a job on one
machine and a job on a cluster start their ranks the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from megagpt.contract import COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S


def launch_environment(
    nproc_per_node: int,
    environ: Mapping[str, str] | None = None,
    cpus: int | None = None,
    collective_timeout_s: int | None = None,
) -> dict[str, str]:
    """A copy of `environ` with megagpt's defaults filled in where a variable is unset.

    Args:
        nproc_per_node: Training processes on this machine; they share its cores.
        environ: The environment to start from (default: this process's).
        cpus: Cores available to this node's processes (default: SLURM_CPUS_PER_TASK
            under SLURM, else every core this process may run on).
        collective_timeout_s: Process-group timeout; the default is 600 s.
    """
    env = dict(os.environ if environ is None else environ)
    if cpus is None:
        cpus = int(env.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    defaults = {
        # Without it every process starts one thread per core: N processes, N x cores threads.
        "OMP_NUM_THREADS": str(max(1, cpus // max(1, nproc_per_node))),
        # A NCCL collective that times out tears the process down instead of hanging forever.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        COLLECTIVE_TIMEOUT_ENV: str(collective_timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S),
        # Python stacks on SIGABRT/SIGSEGV (a NCCL abort, a crash in an extension).
        "PYTHONFAULTHANDLER": "1",
        # Log lines reach the job log as they are written, not when a buffer fills.
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def resume_by_default(overrides: list[str]) -> list[str]:
    """Overrides for a launched `megagpt train`. A launched job may be restarted
    (requeue, preemption, a node failure), so it resumes from its own latest
    checkpoint unless the user chose otherwise with checkpoint.resume."""
    if any(o.startswith("checkpoint.resume=") for o in overrides):
        return list(overrides)
    return [*overrides, "checkpoint.resume=auto"]
