"""`megagpt plan`: per-GPU memory and step time of a model on a cluster, for one layout
or, ranked, for every layout that fits."""

from __future__ import annotations

import json
import math

from megagpt.config import ConfigError, load_config
from megagpt.data.settings import check_data_config
from megagpt.planning.calibrate import measure_matmul_tflops
from megagpt.planning.hardware import find_accelerator, load_accelerators
from megagpt.planning.layouts import Layout, apply_layout, parse_layout
from megagpt.planning.plan import OFF, Plan, plan_layout, search

GIB = 2**30
MEMORY_PARTS = ("parameters", "gradients", "optimizer_state", "activations", "buffers", "margin")


def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict per-GPU memory and step time of a model on a cluster layout",
        description="Without --layout, every layout of --gpus that fits, fastest first.",
    )
    p.add_argument("--config", required=True, help="YAML file or preset (gpt3-13b)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu", default="h100-80gb", help="accelerator name (see --list-gpus)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--layout",
        help="tp=2,pp=4,vp=2,dp=8,zero=1,ac=selective,mbs=1,sp=1,schedule=1f1b "
        "(and cp=2: context parallelism; ep=2: expert parallelism of an MoE model; "
        "offload=cpu: FSDP2's CPU offload; engine=deepspeed with offload_optimizer=cpu|nvme "
        "and, at zero=3, offload_params=cpu|nvme)",
    )
    p.add_argument("--hardware", help="YAML file adding or replacing accelerators")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--matmul-tflops",
        type=float,
        help="achievable matmul TFLOP/s of one GPU (instead of the table's fraction of peak)",
    )
    rate.add_argument(
        "--measure-matmul",
        action="store_true",
        help="measure it on this machine's GPU (bf16), or CPU (fp32) without one",
    )
    p.add_argument("--top", type=int, default=10, help="layouts shown when searching")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help="settings as section.key=value")


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _describe(plan: Plan) -> list[str]:
    lines = [f"layout {plan.layout}: " + ("fits" if plan.fits else "DOES NOT FIT")]
    lines.append("  memory per GPU (GiB): pipeline rank  " + "  ".join(MEMORY_PARTS) + "  total")
    for rank, memory in enumerate(plan.memory):
        parts = "  ".join(_gib(memory[k]) for k in MEMORY_PARTS)
        lines.append(f"    {rank:>3}  {parts}  {_gib(memory['total'])}")
        for where, name in OFF.items():
            if memory[where]:
                kinds, size = plan.kinds_in(where), _gib(memory[where])
                lines.append(f"         ({kinds} in {name}: {size} GiB, not in the total)")
    lines.append(f"  capacity {_gib(plan.capacity)} GiB")
    t = plan.time
    lines.append(
        "  step {step_s:.3f} s = compute {compute_s:.3f} + tensor {tensor_parallel_s:.3f} "
        "+ pipeline p2p {pipeline_p2p_s:.3f} + bubble {bubble_s:.3f} + data (exposed) "
        "{data_parallel_exposed_s:.3f} of {data_parallel_s:.3f} "
        "+ optimizer {optimizer_s:.4f}".format(**t)
        + (" + offload copies {offload_s:.3f}".format(**t) if t["offload_s"] else "")
        + (
            " + context ring {context_parallel_s:.3f}".format(**t)
            if t["context_parallel_s"]
            else ""
        )
        + (
            " + expert all-to-all {expert_parallel_s:.3f}".format(**t)
            if t["expert_parallel_s"]
            else ""
        )
    )
    lines.append(f"  {t['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU {t['mfu']:.1%}")
    lines += [f"  ({note})" for note in plan.notes]
    return lines


def _train_command(config_name: str, layout: Layout, overrides: list[str], gpus_per_node: int):
    settings = [
        f"parallel.tensor_parallel_size={layout.tp}",
        f"parallel.pipeline_parallel_size={layout.pp}",
        f"parallel.zero_stage={layout.zero}",
        f"parallel.activation_checkpointing={layout.ac}",
        f"train.micro_batch_size={layout.mbs}",
    ]
    if layout.sp:
        settings.append("parallel.sequence_parallel=true")
    if layout.pp > 1:
        settings.append(f"parallel.pipeline_schedule={layout.schedule}")
        settings.append(f"parallel.virtual_stages={layout.vp}")
    if layout.offload:
        settings.append("parallel.offload_optimizer=cpu")
    if layout.engine != "native":
        settings.append(f"parallel.engine={layout.engine}")
    for key in ("offload_optimizer", "offload_params"):
        if getattr(layout, key) != "none":
            settings.append(f"parallel.{key}={getattr(layout, key)}")
    if layout.cp > 1:
        settings.append(f"parallel.context_parallel_size={layout.cp}")
    if layout.ep > 1:
        settings.append(f"parallel.expert_parallel_size={layout.ep}")
    nodes = math.ceil(layout.world_size / gpus_per_node)
    per_node = min(layout.world_size, gpus_per_node)
    return (
        f"megagpt launch slurm --nodes {nodes} --gpus-per-node {per_node} "
        f"--config {config_name} {' '.join([*overrides, *settings])}"
    )


def run_plan(args) -> int:
    config = load_config(args.config, args.overrides)
    check_data_config(config.data)
    gpu = find_accelerator(args.gpu, load_accelerators(args.hardware))
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError("--gpus and --gpus-per-node must be at least 1")
    rate = args.matmul_tflops
    if args.measure_matmul:
        rate = measure_matmul_tflops()
        print(f"measured matmul rate on this machine: {rate:.3g} TFLOP/s")
    if rate is not None and rate <= 0:
        raise ConfigError(f"--matmul-tflops {rate}: must be positive")
    if args.layout:
        layout = parse_layout(args.layout, args.gpus)
        apply_layout(config, layout)  # a clear error for a layout megagpt would refuse
        plans = [plan_layout(config, layout, gpu, args.gpus_per_node, matmul_tflops=rate)]
    else:
        plans = search(config, args.gpus, gpu, args.gpus_per_node, rate)[: args.top]
    if args.json:
        print(json.dumps([plan.to_dict() for plan in plans], indent=2))
        return 0 if plans and plans[0].fits else 1
    if not plans:
        print(
            f"no layout of {args.gpus} x {gpu.name} fits {args.config}: add GPUs, "
            "shorten data.seq_len or lower train.global_batch_size"
        )
        return 1
    if not args.layout:
        print(f"{len(plans)} fastest layouts of {args.gpus} x {gpu.name} that fit, best first:")
        for plan in plans:
            print(
                f"  {plan.time['step_s']:8.3f} s/step  {plan.time['mfu']:6.1%} MFU  "
                f"peak {_gib(plan.peak)} GiB  {plan.layout}"
            )
        print()
    print("\n".join(_describe(plans[0])))
    print(
        "\ntrain it with:\n  "
        + _train_command(args.config, plans[0].layout, args.overrides, args.gpus_per_node)
    )
    return 0 if plans[0].fits else 1
