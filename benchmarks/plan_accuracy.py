"""How right is `megagpt plan`? Memory against measured runs, beside DeepSpeed's ZeRO
estimators and Megatron's theoretical-memory formula; step times ordered as measured.

memory: the layouts of tests/test_plan.py (tiny GPT, 1-8 gloo ranks) in bf16 autocast,
    each rank's model states (memory_bytes) and peak saved activations (ActivationMeter)
    against the plan; DeepSpeed's `estimate_zero2/3_model_states_mem_needs` (data
    parallel only, mixed precision: 16-bit weights plus fp32 master copy) and Megatron's
    formulas (theoretical_memory_usage.py: 18 bytes per parameter, or 6 + 12/dp with the
    distributed optimizer; activations 34 s b h / t per layer with sequence parallelism
    and selective recomputation, else s b h (10 + 24 / t)), for what each covers.
time: layouts of 2 gloo ranks (one thread each) trained by megagpt's own loop
    (as benchmarks/parallel_overhead.py), median tokens/s after step 2, against the
    plan's step time on this CPU, all its inputs measured in the same run: gloo's
    bandwidth and latency (best all-reduce times), the copy bandwidth, the framework's
    host time per block for each parallel style (the slope over two depths of what the
    plan without it misses, on a 64-wide model whose FLOPs are negligible: a different
    model from the one predicted) and the model FLOP rate one process achieves less that
    host time; the orders compared by Kendall's tau-b, and the tokens/s errors.

    pip install deepspeed   # for its estimators (the memory part)
    python benchmarks/plan_accuracy.py [--part memory|time|both] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel_overhead import measure, step_rates, write_random_tokens  # noqa: E402

from megagpt.config import load_config  # noqa: E402
from megagpt.model.flops import flops_per_token, parameter_counts  # noqa: E402
from megagpt.planning.calibrate import (  # noqa: E402
    calibrate,
    measure_matmul_tflops,
)
from megagpt.planning.hardware import cpu_accelerator  # noqa: E402
from megagpt.planning.layouts import Layout  # noqa: E402
from megagpt.planning.plan import plan_layout  # noqa: E402
from megagpt.testing import run_distributed  # noqa: E402
from tests.activation_probe import measure_layout, probe_config  # noqa: E402
from tests.test_plan import MEASURED_LAYOUTS  # noqa: E402

STATES = ("parameters", "gradients", "optimizer_state")


def megatron_bytes(config, layout: Layout) -> tuple[float, float]:
    """Megatron's theoretical memory of the most loaded (first) pipeline rank, as its
    theoretical_memory_usage.py computes it: weights + optimizer, activations."""
    m, s, b = config.model, config.data.seq_len, layout.mbs
    counts = parameter_counts(m)
    shard = (counts["blocks"] / layout.pp + counts["embedding"] + counts["positions"]) / layout.tp
    per_param = 6 + 12 / layout.dp if layout.zero > 0 else 18
    h, t, p = m.hidden_size, layout.tp, layout.pp
    microbatches = config.train.global_batch_size // (b * layout.dp)
    if layout.sp and layout.ac == "selective":
        layer = s * b * h * (18 + 4 * m.mlp_width / h) / t
    else:
        layer = s * b * h * (10 + 24 / t)
    acts = layer * m.n_layers + (8 * s * b + s * b * h) * p / (t if layout.sp else 1)
    if layout.vp > 1:
        acts *= 1 + (p - 1) / (p * layout.vp)
    elif p > 1:
        acts *= min(1, microbatches / p)
    if p == 1:
        acts += s * b * (h + m.padded_vocab_size / t) * 2
    return shard * per_param, acts


def deepspeed_bytes(config, layout: Layout) -> float | None:
    """DeepSpeed's ZeRO estimate of GPU model-state bytes (data parallel layouts only)."""
    if layout.tp > 1 or layout.pp > 1:
        return None
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = parameter_counts(config.model)["total"]
    if layout.zero == 3:
        largest = config.model.padded_vocab_size * config.model.hidden_size
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, layout.dp, 1, cpu_offload=False, cpu_offload_params=False
        )
        return gpu
    _, gpu = estimate_zero2_model_states_mem_needs(total, layout.dp, 1, cpu_offload=False)
    return gpu


def memory_part(tmp: str) -> None:
    print(
        "| layout | rank | states: measured / plan / DeepSpeed / Megatron | "
        "activations: measured / plan / Megatron |"
    )
    print("|---|---|---|---|")
    worst = 0.0
    for overrides, world in MEASURED_LAYOUTS:
        overrides = {**overrides, "train.precision": "bf16"}
        config = probe_config(overrides, tmp)
        layout = Layout.from_config(config, world)
        plan = plan_layout(
            config, layout, cpu_accelerator(64, 1, 1, 1), 8, calibrate(config.model, "bf16")
        )
        mega_states, mega_acts = megatron_bytes(config, layout)
        speed = deepspeed_bytes(config, layout)
        seen = set()
        for rank in measure_layout(overrides, world, tmp):
            if rank["pp_rank"] in seen:
                continue
            seen.add(rank["pp_rank"])
            planned = plan.memory[rank["pp_rank"]]
            measured = sum(rank[k] for k in STATES)
            states = sum(planned[k] for k in STATES)
            act, act_plan = rank["activations"], planned["activations"]
            worst = max(worst, abs(act_plan / act - 1), abs(states / measured - 1))
            ds = f"{speed / measured:.2f}x" if speed else "n/a"
            mega = f"{mega_states / measured:.2f}x" if rank["pp_rank"] == 0 else "n/a"
            mega_a = f"{mega_acts / act:.2f}x" if rank["pp_rank"] == 0 else "n/a"
            print(
                f"| {layout} | {rank['rank']} | {measured:,} / {states / measured:.3f}x / {ds} / "
                f"{mega} | {act:,} / {act_plan / act:.3f}x / {mega_a} |",
                flush=True,
            )
    print(f"largest plan error: {worst:.1%}")


TIME_LAYOUTS = {
    "dp2 zero0": ["parallel.zero_stage=0"],
    "dp2 zero3": ["parallel.zero_stage=3"],
    "dp2 zero0, full AC": ["parallel.activation_checkpointing=full"],
    "tp2": ["parallel.tensor_parallel_size=2"],
    "tp2 sp": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2 1f1b": ["parallel.pipeline_parallel_size=2"],
    "pp2 gpipe": ["parallel.pipeline_parallel_size=2", "parallel.pipeline_schedule=gpipe"],
    "dp2 zero0 mbs1": ["train.micro_batch_size=1"],
}


def gloo_link() -> tuple[float, float]:
    """(GB/s, microseconds) of a 2-rank gloo all-reduce here, from the best times of a
    16 MiB one and a tiny one. (Medians were tried: on this shared VM they move the
    latency from 10 us to 2.5 ms between runs. What a mid-sized message waits beyond
    these, tensor parallelism's per block, lands in the measured per-block time.)"""
    torch.set_num_threads(1)
    big, tiny = torch.ones(4 * 2**20), torch.ones(1)

    def best(tensor, repeats):
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        return min(times)

    latency = best(tiny, 50)
    seconds = best(big, 5) - latency
    return big.numel() * 4 / seconds / 1e9, latency * 1e6


def copy_gbps() -> float:
    """Bytes read and written per second by one thread copying 64 MiB here (median)."""
    a, b = torch.ones(16 * 2**20), torch.empty(16 * 2**20)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * 4 / statistics.median(times) / 1e9


def measure_single(base: list[str], workdir: Path) -> float:
    """Median tokens/s of one process (one thread) training `base`, after step 2."""
    return statistics.median(step_rates([], base, workdir, world=1))


def _kendall(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (scipy's default): pairs tied in either order count for neither
    side (the plan gives 1F1B and GPipe the same time: they differ in memory)."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    signs = [(a[i] - a[j]) * (b[i] - b[j]) for i, j in pairs]
    concordant, discordant = sum(s > 0 for s in signs), sum(s < 0 for s in signs)
    untied_a = sum(a[i] != a[j] for i, j in pairs)
    untied_b = sum(b[i] != b[j] for i, j in pairs)
    return (concordant - discordant) / (untied_a * untied_b) ** 0.5


# The framework's host time per block, by parallel style: measured on a narrow model
# (FLOPs negligible) at two depths, so what grows with the blocks is separated from
# what each step pays once (embedding, output layer, optimizer, the loop).
OVERHEAD_STYLES = {
    "block": ["parallel.zero_stage=0"],
    "sharded": ["parallel.zero_stage=3"],
    "tensor_parallel": ["parallel.tensor_parallel_size=2"],
    "sequence_parallel": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
}
# Narrow steps are short and this shared machine's noisy: more of them for the median.
NARROW = ["model.hidden_size=64", "model.n_heads=8", "data.seq_len=16", "train.max_steps=24"]
DEPTHS = (2, 6)


def quiet_step_seconds(overrides: list[str], base: list[str], workdir: Path) -> float:
    """The lower quartile of a 2-rank run's step times after step 2: a slope between
    two runs is a difference of small numbers, and one burst of the host's CPU steal in
    either (they come and go here, doubling a step) would swamp it."""
    config = load_config(None, [*base, *overrides])
    tokens = config.train.global_batch_size * config.data.seq_len
    seconds = [tokens / rate for rate in step_rates(overrides, base, workdir)]
    return statistics.quantiles(seconds, n=4)[0]


def _missed_us_per_block(style, base, workdir, steps, accelerator, rate) -> float:
    """Microseconds per block per microbatch that the plan without overheads leaves out
    of this style's measured step on the narrow model (the slope over DEPTHS)."""
    missed = []
    for depth in DEPTHS:
        overrides = [*OVERHEAD_STYLES[style], *NARROW, f"model.n_layers={depth}"]
        config = load_config(None, [*base, *overrides])
        measured = quiet_step_seconds(overrides, base, workdir)
        layout = Layout.from_config(config, 2)
        planned = plan_layout(config, layout, accelerator, 2, None, rate).time["step_s"]
        microbatches = config.train.global_batch_size // (layout.mbs * layout.dp)
        missed.append((measured - planned) / microbatches)
    return (missed[1] - missed[0]) / (DEPTHS[1] - DEPTHS[0]) * 1e6


def framework_overheads(base, workdir, steps, accelerator, rate) -> dict[str, float]:
    """The accelerator's overheads (hardware.py), each style's extra over the one below
    it; FSDP2's per gather or reduce-scatter (three per microbatch at ZeRO-3)."""
    slope = {
        style: _missed_us_per_block(style, base, workdir, steps, accelerator, rate)
        for style in OVERHEAD_STYLES
    }
    return {
        "block": slope["block"],
        "sharded": (slope["sharded"] - slope["block"]) / 3,
        "tensor_parallel": slope["tensor_parallel"] - slope["block"],
        "sequence_parallel": slope["sequence_parallel"] - slope["tensor_parallel"],
    }


def time_part(tmp: str, steps: int) -> None:
    workdir = Path(tmp)
    write_random_tokens(workdir / "random", 4096, 2000, 512)
    base = [
        f"data.path={workdir / 'random'}", "data.split=100,0,0", "data.seq_len=128",
        "model.vocab_size=4096", "model.n_layers=4", "model.hidden_size=256",
        "model.n_heads=8", f"train.max_steps={steps}", "train.eval_interval=0",
        "train.global_batch_size=16", "train.micro_batch_size=2", "optim.warmup_steps=1",
        "logging.log_interval=1", "logging.level=WARNING", "logging.tensorboard=false",
        "logging.peak_tflops=1", "checkpoint.keep_last=1", "train.precision=fp32",
    ]  # fmt: skip
    torch.set_num_threads(1)
    rate = measure_matmul_tflops(512)
    bandwidth, latency = run_distributed(gloo_link, 2)[0]
    memory = copy_gbps()
    print(
        f"this CPU: {rate:.3g} TFLOP/s fp32 on one thread; copies {memory:.1f} GB/s; gloo "
        f"{bandwidth:.2f} GB/s, {latency:.0f} us per all-reduce"
    )
    # megagpt's own FLOP rate: one process training the model at the same microbatch,
    # less its framework time per block. (Scaling it per layout by the rate of that
    # layout's block matmul shapes was tried: on this shared machine the differences
    # drowned in the noise of timing small matmuls. So was scaling it by the matmul
    # rate of both ranks computing at once against one alone: noise again, +-20%.)
    single = load_config(None, base)
    one = measure_single(base, workdir)
    bare = cpu_accelerator(8, rate, bandwidth, latency, memory_gbps=memory)
    overheads = framework_overheads(base, workdir, steps, bare, rate)
    print(
        "framework time per block per microbatch (us): "
        + ", ".join(f"{k} {v:.0f}" for k, v in overheads.items())
    )
    tokens = single.train.global_batch_size * single.data.seq_len
    blocks = single.model.n_layers * single.train.global_batch_size // single.train.micro_batch_size
    flop_seconds = tokens / one - blocks * overheads["block"] * 1e-6
    achieved = tokens * flops_per_token(single.model, single.data.seq_len) / flop_seconds / 1e12
    print(f"one process: {one:.0f} tokens/s = {achieved:.3g} model TFLOP/s less its overheads")
    cpu = cpu_accelerator(8, achieved, bandwidth, latency, overheads, memory)
    measured, predicted = [], []
    for name, overrides in TIME_LAYOUTS.items():
        config = load_config(None, [*base, *overrides])
        layout = Layout.from_config(config, 2)
        plan = plan_layout(config, layout, cpu, 2, calibrate(config.model, "fp32"), achieved)
        tokens_per_s = measure(overrides, base, workdir, steps)
        measured.append(tokens_per_s)
        predicted.append(plan.time["tokens_per_s_per_gpu"] * 2)
        print(
            f"{name:>20}: measured {tokens_per_s:8.0f} tokens/s, plan {predicted[-1]:8.0f} "
            f"(step {plan.time['step_s']:.3f} s)",
            flush=True,
        )
    names = list(TIME_LAYOUTS)
    by_measured = [names[i] for i in sorted(range(len(names)), key=lambda i: -measured[i])]
    by_plan = [names[i] for i in sorted(range(len(names)), key=lambda i: -predicted[i])]
    print("fastest first, measured:", ", ".join(by_measured))
    print("fastest first, planned: ", ", ".join(by_plan))
    print(f"Kendall's tau between the orders: {_kendall(measured, predicted):.2f}")
    errors = [abs(p / m - 1) for p, m in zip(predicted, measured)]
    print(f"tokens/s error: mean {statistics.mean(errors):.1%}, largest {max(errors):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory", "time", "both"), default="both")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("memory", "both"):
            memory_part(tmp)
        if args.part in ("time", "both"):
            time_part(tmp, args.steps)


if __name__ == "__main__":
    main()
