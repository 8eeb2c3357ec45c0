"""Checkpoint speed for a ~350M-parameter model on CPU, against the disk itself.

In one run, in the same directory: the disk's sequential write speed (a dd-style
write of the same number of bytes as the checkpoint, fsynced), then megagpt's
Checkpointer saving model + AdamW state synchronously, then asynchronously twice
(each followed by one real forward/backward, as the next training step, and the wait
before its optimizer update: together the time training is blocked), and loading;
all of it without per-file CRC-32 checksums, with them, and without again. Prints the
ratios the checkpoint issues set goals for: blocked / synchronous save (goal <= 10%),
save throughput with / without checksums (goal >= 90%), and save throughput / disk
write speed (goal >= 50%).

    python benchmarks/checkpoint.py [--dir /path/on/the/disk/to/test] [--shape gpt2-350m]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from megagpt.checkpoint import Checkpointer
from megagpt.checkpoint.state import collect
from megagpt.config import apply_overrides, load_config
from megagpt.parallel import init_distributed, shutdown_distributed
from megagpt.parallel.parallelize import parallelize


def disk_write_speed(directory: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Bytes per second of a sequential, fsynced write of `nbytes` (like dd conv=fsync)."""
    block = os.urandom(chunk)
    path = directory / "dd.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block)
            written += chunk
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return written / elapsed


def state_bytes(state: dict) -> int:
    return sum(
        t.numel() * t.element_size()
        for section in state.values()
        for t in section.values()
        if isinstance(t, torch.Tensor)
    )


def measure(config, module, work: Path, checksums: bool, forward_backward) -> dict:
    """One synchronous save and two asynchronous ones (each followed by a real
    forward/backward and the wait before the next update), with or without checksums."""

    def checkpointer_for(async_save: bool) -> Checkpointer:
        config.checkpoint.async_save = async_save
        return Checkpointer(config, module, work / "checkpoints", True, checksums=checksums)

    checkpointer = checkpointer_for(False)
    start = time.perf_counter()
    checkpointer.save(1, {"consumed_samples": 0})
    sync_s = time.perf_counter() - start
    async_runs = []
    checkpointer = checkpointer_for(True)
    for step in (2, 3):
        start = time.perf_counter()
        checkpointer.save(step, {"consumed_samples": 0})
        call_s = time.perf_counter() - start
        work_start = time.perf_counter()
        forward_backward()
        work_s = time.perf_counter() - work_start
        wait_start = time.perf_counter()
        checkpointer.before_update()
        waited_s = time.perf_counter() - wait_start
        checkpointer.wait()
        async_runs.append(
            (call_s + waited_s, call_s, waited_s, work_s, time.perf_counter() - start)
        )
    start = time.perf_counter()
    assert checkpointer.verify(work / "checkpoints" / "step_00000003") == []
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    checkpointer.load(work / "checkpoints" / "step_00000003")
    load_s = time.perf_counter() - start
    return {"sync_s": sync_s, "async": async_runs, "verify_s": verify_s, "load_s": load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--shape", default="gpt2-350m")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens of the forward/backward that follows each async save",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="megagpt-ckpt-bench-"))
    try:
        config = apply_overrides(
            load_config(args.shape), [f"train.output_dir={work}", "checkpoint.keep_last=1"], "bench"
        )
        env = init_distributed("cpu")  # the one-process layout, as `megagpt train` runs
        module = parallelize(config, env)
        nbytes = state_bytes(collect(module.parts, module.optimizers))  # creates AdamW's state
        params = sum(p.numel() for p in module.parameters())
        disk = disk_write_speed(work, nbytes)
        tokens = torch.randint(0, config.model.vocab_size, (1, args.seq_len + 1))

        def forward_backward() -> None:  # the next training step, up to its update
            module.parts[0](tokens[:, :-1], tokens[:, 1:]).backward()

        # Without checksums first, then with, then without again: the machine's drift
        # shows as the difference between the two runs without.
        runs = [
            (checksums, measure(config, module, work, checksums, forward_backward))
            for checksums in (False, True, False)
        ]
        gb = nbytes / 1e9
        print(
            f"{args.shape}: {params / 1e6:.0f}M parameters; model + AdamW state "
            f"{gb:.2f} GB fp32; CPU, torch {torch.__version__}; {work}"
        )
        print(f"  disk sequential write (fsync)  : {disk / 1e9:.2f} GB/s")
        for checksums, run in runs:
            label = "with CRC-32 checksums" if checksums else "without checksums"
            print(f"  {label}:")
            print(
                f"    synchronous save             : {run['sync_s']:6.2f} s  "
                f"({nbytes / run['sync_s'] / 1e9:.2f} GB/s)"
            )
            for i, (blocked, call_s, waited_s, work_s, total) in enumerate(run["async"], 1):
                print(
                    f"    asynchronous save #{i}        : training blocked {blocked:5.2f} s "
                    f"(save call {call_s:.2f} s + wait at the next update {waited_s:.2f} s, "
                    f"after a {work_s:.1f} s forward/backward); written in {total:.2f} s"
                )
            print(
                f"    verify before a resume       : {run['verify_s']:6.2f} s; load into a live "
                f"model {run['load_s']:.2f} s ({nbytes / run['load_s'] / 1e9:.2f} GB/s)"
            )
        with_sums = runs[1][1]
        without = min((run for c, run in runs if not c), key=lambda r: r["sync_s"])
        worst_blocked = max(r[0] for r in with_sums["async"])
        print(
            f"blocked / synchronous save, with checksums: "
            f"{worst_blocked / with_sums['sync_s']:.3f}  (goal <= 0.10)"
        )
        print(
            f"save throughput with / without checksums: "
            f"{without['sync_s'] / with_sums['sync_s']:.3f}  (goal >= 0.90; the two runs "
            f"without: {runs[0][1]['sync_s']:.2f} s and {runs[2][1]['sync_s']:.2f} s)"
        )
        print(
            f"save throughput / disk write speed: {nbytes / with_sums['sync_s'] / disk:.3f}  "
            "(goal >= 0.50)"
        )
        shutdown_distributed(env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
