"""Throughput of the parallel layouts on two ranks, relative to plain data parallelism.

Runs megagpt's real training loop on two gloo processes (one CPU core each) for each
layout: dp2 ZeRO-0 (the baseline), dp2 ZeRO-1, dp2 ZeRO-3, tp2, pp2 with 1F1B over 8
microbatches and cp2 (context parallel, ring attention). All see the same model,
global batch and data. Expert parallelism needs a mixture-of-experts model: the same
model with 8 experts (top 2, a quarter of the MLP width each, so as many active
weights as the dense MLP) runs as dp2 ZeRO-0 (its own baseline), dp2 ZeRO-1 and ep2
ZeRO-1. Every layout is run `--rounds` times in alternation and its median tokens/s
over steps after the second is reported, with the ratio to its baseline.

    python benchmarks/parallel_overhead.py [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from megagpt.config import load_config
from megagpt.data import IndexedDatasetWriter
from megagpt.testing import run_distributed
from megagpt.training.trainer import train

LAYOUTS = {
    "dp2 zero0 (baseline)": ["parallel.zero_stage=0"],
    "dp2 zero1": ["parallel.zero_stage=1"],
    "dp2 zero3": ["parallel.zero_stage=3"],
    "tp2": ["parallel.tensor_parallel_size=2"],
    "pp2 1f1b, 8 microbatches": [
        "parallel.pipeline_parallel_size=2",
        "parallel.pipeline_schedule=1f1b",
    ],
    "cp2": ["parallel.context_parallel_size=2"],
}
MOE = [
    "model.activation=swiglu",
    "model.moe.num_experts=8",
    "model.moe.top_k=2",
    "model.moe.expert_width=176",  # a quarter of the dense SwiGLU width (704)
]
MOE_BASELINE = "moe dp2 zero0 (baseline)"
MOE_LAYOUTS = {
    MOE_BASELINE: [*MOE, "parallel.zero_stage=0"],
    "moe dp2 zero1": [*MOE, "parallel.zero_stage=1"],
    "moe ep2 zero1": [*MOE, "parallel.zero_stage=1", "parallel.expert_parallel_size=2"],
}


def write_random_tokens(prefix: Path, vocab: int, documents: int, length: int) -> None:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(documents):
            writer.add_document(rng.integers(0, vocab, length))


def step_rates(overrides: list[str], base: list[str], workdir: Path, world: int = 2) -> list[float]:
    """tokens/s of each step after step 2 of megagpt training `base` + `overrides` on
    `world` gloo ranks."""
    out = workdir / f"run-{time.monotonic_ns()}"
    config = load_config(None, [*base, *overrides, f"train.output_dir={out}"])
    run_distributed(train, world, args=(config,), timeout_s=1800)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r["tokens_per_s"] for r in records if r["step"] > 2]


def measure(overrides: list[str], base: list[str], workdir: Path, steps: int) -> float:
    return statistics.median(step_rates(overrides, base, workdir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_random_tokens(workdir / "random", 4096, 2000, 512)
        # global batch 16 of micro 2: dp2 ranks run 4 microbatches, tp2/pp2 run 8.
        base = [
            f"data.path={workdir / 'random'}",
            "data.split=100,0,0",
            "data.seq_len=128",
            "model.vocab_size=4096",
            "model.n_layers=4",
            "model.hidden_size=256",
            "model.n_heads=8",
            f"train.max_steps={args.steps}",
            "train.eval_interval=0",
            "train.global_batch_size=16",
            "train.micro_batch_size=2",
            "optim.warmup_steps=1",
            "logging.log_interval=1",
            "logging.level=WARNING",
            "logging.tensorboard=false",
            "logging.peak_tflops=1",
            "checkpoint.keep_last=1",
        ]
        layouts = LAYOUTS | MOE_LAYOUTS
        rates: dict[str, list[float]] = {name: [] for name in layouts}
        started = time.perf_counter()
        for round_ in range(args.rounds):
            order = list(layouts.items())
            for name, overrides in order if round_ % 2 == 0 else order[::-1]:
                rates[name].append(measure(overrides, base, workdir, args.steps))
    baselines = {
        name: statistics.median(
            rates[MOE_BASELINE if name in MOE_LAYOUTS else "dp2 zero0 (baseline)"]
        )
        for name in rates
    }
    print(
        f"2 gloo ranks x 1 CPU thread; 4 layers, hidden 256, vocab 4096, global batch 16 x "
        f"128 tokens; median over steps 3-{args.steps} of {args.rounds} runs each "
        f"({time.perf_counter() - started:.0f}s)"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:>26}: {median:8.0f} tokens/s   ratio {median / baselines[name]:.3f}")


if __name__ == "__main__":
    main()
