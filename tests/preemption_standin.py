"""A stand-in for `megagpt train` that tests run under SLURM and torchrun.

Each "step" sleeps 0.1 s; the ranks (gloo) ask PreemptionHandler.should_stop after
every step, exactly as the trainer will. On a stop signal rank 0 records the step in
STATE_DIR/checkpoint.json and every rank exits with REQUEUE_EXIT_CODE; a restarted run
resumes from that step. Lines starting "standin:" go to stdout (the job log).

    python tests/preemption_standin.py STATE_DIR [--finish-from-restart K]

From restart K on (SLURM_RESTART_COUNT), the run finishes 3 steps after resuming;
before it, the run waits for a signal (at most --max-seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megagpt.contract import REQUEUE_EXIT_CODE
from megagpt.training.preemption import PreemptionHandler


def say(message: str) -> None:
    print(f"standin: {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--finish-from-restart", type=int, default=1_000_000)
    parser.add_argument("--max-seconds", type=float, default=240.0)
    args = parser.parse_args()
    preemption = PreemptionHandler().install()  # before the slow torch import

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    checkpoint = args.state_dir / "checkpoint.json"
    step = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    say(f"rank {rank} restart {restart} resumes at step {step}")
    dist.barrier()
    if rank == 0:
        (args.state_dir / f"ready-{restart}").touch()
    last = step + 3 if restart >= args.finish_from_restart else None
    deadline = time.monotonic() + args.max_seconds
    code = 1
    while time.monotonic() < deadline:
        time.sleep(0.1)
        step += 1
        if preemption.should_stop(step):
            got = preemption.received.name if preemption.received else "nothing"
            say(f"rank {rank} restart {restart} stops at step {step} (this rank got {got})")
            if rank == 0:
                checkpoint.write_text(json.dumps({"step": step, "restart": restart}))
            code = REQUEUE_EXIT_CODE
            break
        if step == last:
            say(f"rank {rank} restart {restart} finished at step {step}")
            code = 0
            break
    else:
        say(f"rank {rank} restart {restart}: no stop signal within {args.max_seconds:.0f}s")
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
