"""Checkpoint speed for a ~350M-parameter model on CPU, against the disk itself.

In one run, in the same directory: the disk's sequential write speed (a dd-style
write of the same number of bytes as the checkpoint, fsynced), then megagpt's
Checkpointer saving model + AdamW state synchronously, then asynchronously twice
(each followed by one real forward/backward, as the next training step, and the wait
before its optimizer update: together the time training is blocked), and loading;
all of it without per-file XXH3-64 checksums, with them, and without again. Prints the
ratios the checkpoint issues set goals for: blocked / synchronous save (goal <= 10%),
save throughput with / without checksums (goal >= 90%), and save throughput / disk
write speed (goal >= 50%).

    python benchmarks/checkpoint.py [--dir /path/on/the/disk/to/test] [--shape gpt2-350m]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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


def sync_save(config, module, work: Path, checksums: bool, step: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one synchronous save, started with no dirty pages left."""
    config.checkpoint.async_save = False
    checkpointer = Checkpointer(config, module, work / "checkpoints", True, checksums=checksums)
    os.sync()
    wall, cpu = time.perf_counter(), time.process_time()
    checkpointer.save(step, {"consumed_samples": 0})
    return time.perf_counter() - wall, time.process_time() - cpu


def async_saves(config, module, work: Path, checksums: bool, forward_backward) -> dict:
    """Two asynchronous saves, each followed by a real forward/backward and the wait
    before the next update (together: the time training is blocked), then a verify and
    a load of the last one."""
    config.checkpoint.async_save = True
    checkpointer = Checkpointer(config, module, work / "checkpoints", True, checksums=checksums)
    runs = []
    for step in (101, 102):
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
        total = time.perf_counter() - start
        runs.append((call_s + waited_s, call_s, waited_s, work_s, total))
    last = work / "checkpoints" / "step_00000102"
    start = time.perf_counter()
    assert checkpointer.verify(last) == []
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    checkpointer.load(last)
    return {"async": runs, "verify_s": verify_s, "load_s": time.perf_counter() - start}


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

        # Synchronous saves alternate without and with checksums, three pairs, so drift
        # in the disk's speed hits both; CPU seconds show the hashing work itself.
        sync = {False: [], True: []}
        for round_ in range(3):
            for checksums in (False, True) if round_ % 2 == 0 else (True, False):
                step = 1 + len(sync[False]) + len(sync[True])
                sync[checksums].append(sync_save(config, module, work, checksums, step))
        asynchronous = {c: async_saves(config, module, work, c, forward_backward) for c in (0, 1)}
        print(
            f"{args.shape}: {params / 1e6:.0f}M parameters; model + AdamW state "
            f"{nbytes / 1e9:.2f} GB fp32; CPU, torch {torch.__version__}; {work}"
        )
        print(f"  disk sequential write (fsync)  : {disk / 1e9:.2f} GB/s")
        medians = {}
        for checksums in (False, True):
            label = "with XXH3-64 checksums" if checksums else "without checksums"
            walls, cpus = zip(*sync[checksums])
            medians[checksums] = (statistics.median(walls), statistics.median(cpus))
            print(f"  {label}:")
            print(
                "    synchronous saves            : "
                + ", ".join(f"{w:.2f} s" for w in walls)
                + f" (median {medians[checksums][0]:.2f} s, "
                f"{nbytes / medians[checksums][0] / 1e9:.2f} GB/s); CPU "
                + ", ".join(f"{c:.2f}" for c in cpus)
                + " s"
            )
            run = asynchronous[int(checksums)]
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
        worst_blocked = max(r[0] for r in asynchronous[1]["async"])
        print(
            f"blocked / synchronous save, with checksums: "
            f"{worst_blocked / medians[True][0]:.3f}  (goal <= 0.10)"
        )
        print(
            f"save throughput with / without checksums (medians): "
            f"{medians[False][0] / medians[True][0]:.3f}  (goal >= 0.90); CPU seconds "
            f"without / with: {medians[False][1] / medians[True][1]:.3f}"
        )
        print(
            f"save throughput / disk write speed, with checksums: "
            f"{nbytes / medians[True][0] / disk:.3f}  (goal >= 0.50)"
        )
        shutdown_distributed(env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
