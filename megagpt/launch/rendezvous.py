"""Where ranks meet under SLURM, derived from the job's SLURM_* variables alone.

No ssh and no shared files: every task of a job computes the same head node (the first
host of SLURM_JOB_NODELIST, as `scontrol show hostnames` lists it) and the same port
(from the job id), so they agree without talking to each other first.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from megagpt.launch.errors import LaunchError

PORT_BASE = 15000
PORT_SPAN = 15000
"""Rendezvous ports lie in [15000, 30000): below Linux's ephemeral range (32768+), so a
port is never taken by some process's outgoing connection."""

_GROUP = re.compile(r"\[([^\[\]]*)\]")


class HostlistError(LaunchError):
    """A SLURM node list that cannot be read."""


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM node list into host names, in `scontrol show hostnames` order.

    >>> expand_hostlist("gpu[01-03,07],login5")
    ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login5']

    Ranges keep the zero padding of their first number; several bracket groups in one
    name expand with the first group varying slowest ("r[1-2]-n[1-2]" gives r1-n1,
    r1-n2, r2-n1, r2-n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        parts = _GROUP.split(item)  # literal, group, literal, group, ..., literal
        literals, groups = parts[0::2], parts[1::2]
        if any("[" in text or "]" in text for text in literals):
            raise HostlistError(f"unbalanced brackets in node list {hostlist!r}")
        choices = [_expand_group(group, hostlist) for group in groups]
        for picked in itertools.product(*choices):
            name = literals[0]
            for number, literal in zip(picked, literals[1:]):
                name += number + literal
            hosts.append(name)
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in hostlist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise HostlistError(f"unbalanced brackets in node list {hostlist!r}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise HostlistError(f"unbalanced brackets in node list {hostlist!r}")
    items.append(current)
    if any(not item for item in items):
        raise HostlistError(f"empty host name in node list {hostlist!r}")
    return items


def _expand_group(group: str, hostlist: str) -> list[str]:
    numbers: list[str] = []
    for piece in group.split(","):
        low, sep, high = piece.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise HostlistError(
                f"range [{group}] in node list {hostlist!r}: expected numbers such as 01-04,07"
            )
        if not sep:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise HostlistError(f"range {piece} in node list {hostlist!r} runs backwards")
        width = len(low)
        numbers.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return numbers


def rendezvous_port(job_id: int | str) -> int:
    """A port for the job's rendezvous, the same on every node of the job.

    Jobs sharing a node get different ports unless their ids differ by a multiple of
    PORT_SPAN (15,000 jobs apart). Array tasks have their own job ids.
    """
    return PORT_BASE + int(job_id) % PORT_SPAN


@dataclass(frozen=True)
class SlurmRendezvous:
    """What the tasks of one SLURM job agree on."""

    job_id: str
    nodes: list[str]
    node_rank: int
    port: int

    @property
    def head_node(self) -> str:
        return self.nodes[0]

    @property
    def endpoint(self) -> str:
        return f"{self.head_node}:{self.port}"


def slurm_rendezvous(environ: Mapping[str, str], port: int | None = None) -> SlurmRendezvous:
    """Read the job id, node list and this node's index from SLURM's variables.

    Raises:
        LaunchError: not inside a SLURM job (the variables are missing).
    """
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not environ.get(k)]
    if missing:
        raise LaunchError(
            f"{' and '.join(missing)} not set: this runs inside a SLURM job step (srun); "
            "outside SLURM use `megagpt launch local`"
        )
    job_id = environ["SLURM_JOB_ID"]
    nodes = expand_hostlist(environ["SLURM_JOB_NODELIST"])
    return SlurmRendezvous(
        job_id=job_id,
        nodes=nodes,
        node_rank=int(environ.get("SLURM_NODEID", "0")),
        port=port or rendezvous_port(job_id),
    )


def task_rank_environment(environ: Mapping[str, str], port: int | None = None) -> dict[str, str]:
    """torch.distributed's variables for one SLURM task per rank (no torchrun).

    RANK comes from SLURM_PROCID, unless torchrun already set RANK: under torchrun every
    worker of a node inherits its srun task's SLURM_PROCID (0 on the first node), so
    SLURM_PROCID does not tell workers apart there.
    """
    if "TORCHELASTIC_RUN_ID" in environ and "RANK" in environ:
        return {}
    rendezvous = slurm_rendezvous(environ, port)
    tasks = int(environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS") or 1)
    return {
        "RANK": environ.get("SLURM_PROCID", "0"),
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE")
        or str(tasks // len(rendezvous.nodes)),
        "MASTER_ADDR": rendezvous.head_node,
        "MASTER_PORT": str(rendezvous.port),
    }
