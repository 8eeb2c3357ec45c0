"""Two gloo ranks under torchrun where rank 0 ends up waiting in an all_reduce that
rank 1 never joins (rank 1 is stuck reading data). Run by tests/test_watchdog.py.

    python tests/stuck_collective.py LIMIT_S

Three normal steps first, then the stuck one; every step is watched by a Watchdog whose
limit is LIMIT_S. Prints "stuck at <unix time>" just before the stuck step.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from megagpt.training.watchdog import Watchdog


def read_next_batch() -> None:
    time.sleep(3600)  # a rank stuck outside any collective: a hung filesystem read


def main() -> None:
    limit = float(sys.argv[1])
    # The process-group timeout is longer than the watchdog's limit, as it should be.
    dist.init_process_group("gloo", timeout=timedelta(seconds=10 * limit))
    rank = dist.get_rank()
    watchdog = Watchdog(multiple=4, min_timeout_s=limit, first_step_timeout_s=limit)
    value = torch.ones(4)
    for _ in range(3):
        with watchdog.step():
            dist.all_reduce(value)
    print(f"stuck at {time.time()}", flush=True)
    with watchdog.step():
        if rank == 0:
            dist.all_reduce(value)
        else:
            read_next_batch()


if __name__ == "__main__":
    main()
