"""What keep_freed_memory() (megagpt/utils/allocator.py) does to a CPU training step.

Runs megagpt's training step on a GPT-2-shaped model (50,257-token vocabulary, so
the step allocates large logits buffers) in fresh subprocesses, alternately with
glibc's default malloc and with the tuning `megagpt train` applies on CPU, and
prints the median step time of each and the speedup.

    python benchmarks/cpu_allocator.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = """
import json, statistics, sys, time
import torch
sys.path.insert(0, {bench_dir!r})
from train_throughput import model_config
from megagpt.model import build_model
from megagpt.utils.allocator import keep_freed_memory
if {tuned}:
    assert keep_freed_memory()
cfg = model_config("gpt2-mini")
model = build_model(cfg, "cpu", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = torch.randint(0, cfg.vocab_size, (4, 257), generator=torch.Generator().manual_seed(0))
times = []
for i in range({steps} + 2):
    start = time.perf_counter()
    loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if i >= 2:
        times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times)))
"""


def run(tuned: bool, steps: int) -> float:
    from pathlib import Path

    code = CHILD.format(bench_dir=str(Path(__file__).parent), tuned=tuned, steps=steps)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="process pairs to run")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    args = parser.parse_args()
    default, tuned = [], []
    started = time.perf_counter()
    for i in range(args.rounds):  # alternate the order so drift hits both
        order = [(False, default), (True, tuned)]
        for flag, into in order if i % 2 == 0 else order[::-1]:
            into.append(run(flag, args.steps))
    d, t = statistics.median(default), statistics.median(tuned)
    print(
        f"megagpt CPU training step, gpt2-mini shape, batch 4 x 256, fp32; "
        f"{args.rounds} processes each ({time.perf_counter() - started:.0f}s)"
    )
    print(f"  glibc default malloc : {d * 1e3:7.1f} ms/step")
    print(f"  keep_freed_memory()  : {t * 1e3:7.1f} ms/step")
    print(f"speedup: {d / t:.2f}x")


if __name__ == "__main__":
    main()
