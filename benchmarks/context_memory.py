"""Activation memory per rank under context parallelism, for one sequence length.

Runs real training steps of the tiny test GPT (2 layers, hidden 64) at data.seq_len
`--seq` on 1, 2, 4 and 8 gloo ranks of context parallelism (data parallel 1), and
prints each layout's peak activation bytes per rank over a whole step (forward and
backward of every microbatch, measured by megagpt.parallel.activation_meter, the
largest rank's) and the ratio to one process: ideally 1/cp, since every activation is
per token; the ring's extra saved key/value blocks and the per-sequence tensors that
every rank keeps (none in this model) would show as the excess.

    python benchmarks/context_memory.py [--seq 256] [--sizes 1 2 4 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers
from tests.activation_probe import measure_layout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    started = time.perf_counter()
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.sizes:
            overrides = {
                "data.seq_len": args.seq,
                "model.max_seq_len": args.seq,
                "parallel.context_parallel_size": cp,
            }
            per_rank = measure_layout(overrides, cp, tmp)
            peaks[cp] = max(rank["activations"] for rank in per_rank)
    print(
        f"tiny GPT (2 layers, hidden 64), sequences of {args.seq} tokens, micro-batch 4, "
        f"fp32; peak activation bytes per rank over a step ({time.perf_counter() - started:.0f}s)"
    )
    base = peaks[args.sizes[0]]
    for cp, peak in peaks.items():
        print(
            f"cp{cp}: {peak:>12,} bytes ({args.seq // cp} tokens per rank)   "
            f"ratio {peak / base:.3f} (1/cp = {1 / cp:.3f})"
        )


if __name__ == "__main__":
    main()
