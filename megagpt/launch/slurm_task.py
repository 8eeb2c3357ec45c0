"""What one `srun` task of a megagpt job runs (see launch/slurm.sbatch.template).

    python -m megagpt.launch.slurm_task --nproc-per-node 8 -- -m megagpt train ...
        one task per node: torchrun's agent with c10d rendezvous on the job's first
        node, 8 training processes on this node
    python -m megagpt.launch.slurm_task --per-task -- -m megagpt train ...
        one task per rank: RANK/WORLD_SIZE/MASTER_ADDR from SLURM_PROCID, SLURM_NTASKS
        and the node list, then this process becomes the training process

Everything after `--` is what each training process runs after `python`. The exit code
is the training processes' own (REQUEUE_EXIT_CODE after a checkpointed stop).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from megagpt.errors import report_user_errors

log = logging.getLogger("megagpt.launch.slurm_task")  # not __name__: run as __main__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megagpt.launch.slurm_task")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--nproc-per-node", type=int, help="torchrun with this many processes")
    mode.add_argument("--per-task", action="store_true", help="this task is one rank")
    parser.add_argument("--port", type=int, help="rendezvous port (default: from the job id)")
    parser.add_argument("command", nargs="+", help="what each process runs after `python`")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    return report_user_errors("megagpt slurm task", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from megagpt.launch.agent import run_agent, torchrun_arguments
    from megagpt.launch.environment import launch_environment
    from megagpt.launch.rendezvous import slurm_rendezvous, task_rank_environment

    rendezvous = slurm_rendezvous(os.environ, args.port)
    if args.per_task:
        env = launch_environment(1)
        env.update(task_rank_environment(os.environ, args.port))
        log.info(
            "rank %s of %s, rendezvous %s", env["RANK"], env["WORLD_SIZE"], rendezvous.endpoint
        )
        command = [sys.executable, *args.command]
        os.execve(sys.executable, command, env)  # signals now reach the trainer itself
    env = launch_environment(args.nproc_per_node)
    arguments = torchrun_arguments(
        args.nproc_per_node,
        args.command,
        nnodes=len(rendezvous.nodes),
        rdzv_endpoint=rendezvous.endpoint,
        rdzv_id=f"slurm-{rendezvous.job_id}",
    )
    log.info(
        "node %d of %d: torchrun %s",
        rendezvous.node_rank,
        len(rendezvous.nodes),
        shlex.join(arguments),
    )
    return run_agent(arguments, env)


if __name__ == "__main__":
    sys.exit(main())
