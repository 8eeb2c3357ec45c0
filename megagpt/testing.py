"""Run a function on N gloo ranks on this machine, for tests and experiments.

    results = run_distributed(some_module_level_function, world_size=2, args=(...))

Each rank is a fresh process with one CPU thread, a joined gloo process group, this
process's environment as it is at the call and the torchrun variables set; the
function's return values come back in rank order, and an exception on any rank is
re-raised here with that rank's traceback.

Ranks are forked from a server process that imported torch and megagpt once, when
the first call started it (multiprocessing's "forkserver"): a spawned rank spends
about six CPU-seconds importing them again, which on a two-core machine was most of
a short test's time. The server imports nothing else and runs nothing, so each
fork starts from a clean, single-threaded interpreter, as a spawned one would.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once in the fork server; each rank inherits them already loaded.
PRELOAD = ["torch", "megagpt.training.trainer"]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable,
    args: Sequence[Any],
    results: mp.Queue,
    environment: dict[str, str],
) -> None:
    # The fork server's environment is the one it started with: take the caller's.
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(*args)
        # The barrier before teardown: without it gloo ranks sometimes abort at exit.
        dist.barrier()
        dist.destroy_process_group()
        # Serialized here, in-band: a queue would share tensors through file
        # descriptors that vanish when this process exits.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable, world_size: int, args: Sequence[Any] = (), timeout_s: float = 300.0
) -> list[Any]:
    """Call `fn(*args)` on `world_size` gloo ranks; return the results by rank.

    `fn` must be importable (defined at module level) since ranks are spawned.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    results = context.Queue()
    port = free_port()
    environment = dict(os.environ)
    processes = [
        context.Process(
            target=_worker, args=(rank, world_size, port, fn, args, results, environment)
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                # A rank that crashed (segfault, import error, os._exit) never reports.
                dead = [
                    (r, p.exitcode)
                    for r, p in enumerate(processes)
                    if r not in collected and p.exitcode is not None and p.exitcode != 0
                ]
                if dead:
                    raise RuntimeError(
                        f"rank(s) exited without reporting (rank, exit code): {dead}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size - len(collected)} of {world_size} ranks did not finish "
                        f"within {timeout_s:.0f}s (finished: {sorted(collected)})"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            collected[rank] = pickle.loads(value)  # our own child's bytes
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(world_size)]
