"""A plan: per-GPU memory and step time of a layout, and the search over layouts.

Memory per pipeline rank (the ranks of a stage are alike up to FSDP2's uneven last
chunk; rank 0's, the largest, is shown): model states and activations (memory.py),
plus what exists only during a step: `buffers` = ZeRO's gathered parameters and
unsharded gradients (stages 1-2 hold the stage's parameters whole from forward to
backward, stage 1 its gradients too; stage 3 two blocks at a time) and two blocks'
worth of collective buffers; then a margin
for the allocator's fragmentation and the CUDA/NCCL context. With the native engine's
CPU offload (`offload=cpu`) parameters, gradients and optimizer state are in host memory
(`host`, not in the GPU's total) and FSDP2 computes on gathered copies (buffers).

The DeepSpeed engine (`engine=deepspeed`) keeps its own partitions (deepspeed_memory.py)
and places each kind by its offload settings: in the GPU's total, in `host` memory or
on `nvme`; its buffers are its gradient buckets and ZeRO-3's gathered blocks. Its
activations are the same GPT's, calibrated on the model cast to bf16 itself (no
autocast, so no weight copies), checkpointed as on the native engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megagpt.config import Config
from megagpt.planning.calibrate import calibrate
from megagpt.planning.deepspeed_memory import (
    deepspeed_buffers,
    deepspeed_state_bytes,
    deepspeed_state_placement,
)
from megagpt.planning.hardware import Accelerator
from megagpt.planning.layouts import Layout, apply_layout, candidate_layouts
from megagpt.planning.memory import (
    Calibration,
    activation_bytes,
    model_state_bytes,
    unsharded_stage_bytes,
)
from megagpt.planning.step_time import ACTIVATION_BYTES, step_time

STATES = ("parameters", "gradients", "optimizer_state")
# Where offloaded states live, outside the GPU's total, and those places in words.
OFF = {"host": "host memory", "nvme": "NVMe"}
CONTEXT_BYTES = 2**30  # CUDA context, NCCL and cuBLAS workspaces: about 1 GiB per GPU
MARGIN = 0.05  # of the rest: the caching allocator's fragmentation


@dataclass
class Plan:
    layout: Layout
    memory: list[dict[str, int]]  # per pipeline rank
    time: dict[str, float]
    capacity: int
    notes: list[str] = field(default_factory=list)
    placement: dict[str, str] = field(default_factory=dict)  # kind: device, host or nvme

    @property
    def peak(self) -> int:
        return max(rank["total"] for rank in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def kinds_in(self, where: str) -> str:
        """The kinds of model state kept in `where` (host or nvme), in words."""
        return ", ".join(k.replace("_", " ") for k, w in self.placement.items() if w == where)

    def to_dict(self) -> dict:
        return {
            "layout": str(self.layout),
            "fits": self.fits,
            "peak_bytes": self.peak,
            "capacity_bytes": self.capacity,
            "memory_per_pipeline_rank": self.memory,
            "time": self.time,
            "notes": self.notes,
            "placement": self.placement,
        }


def state_placement(layout: Layout) -> dict[str, str]:
    """Where each kind of model state lives: device, host or nvme."""
    if layout.engine == "deepspeed":
        return deepspeed_state_placement(layout)
    return dict.fromkeys(STATES, "host" if layout.offload else "device")


def _buffers(config: Config, layout: Layout, pp_rank: int, precision: str) -> int:
    whole = unsharded_stage_bytes(config, layout, pp_rank)
    layers = max(1, config.model.n_layers // (layout.pp * layout.vp)) * layout.vp
    block = whole / layers
    if layout.engine == "deepspeed":
        return deepspeed_buffers(config, layout, block)
    # FSDP2 computes on gathered copies at stage 0 too when it offloads, or shards over
    # context ranks: then stage 0 holds what stage 1 does.
    sharded_zero = layout.zero == 0 and (layout.offload or layout.cp > 1)
    zero = 1 if sharded_zero else layout.zero
    gathered = 0.0
    if zero in (1, 2):
        gathered = whole
    elif zero == 3:
        gathered = 2 * block
    unsharded_grads = whole if zero == 1 else (2 * block if zero >= 2 else 0)
    collectives = 2 * block if layout.dp * layout.cp > 1 else 0.0
    return int(gathered + unsharded_grads + collectives)


def plan_layout(
    config: Config,
    layout: Layout,
    gpu: Accelerator,
    gpus_per_node: int,
    calibrations: dict[str, Calibration] | None = None,
    matmul_tflops: float | None = None,
    context_bytes: int = CONTEXT_BYTES,
) -> Plan:
    config = apply_layout(config, layout)
    precision = "bf16" if config.train.precision == "auto" else config.train.precision
    autocast = layout.engine == "native"  # DeepSpeed casts the model itself
    calibrations = calibrations or calibrate(config.model, precision, autocast)
    placement = state_placement(layout)
    memory = []
    for pp_rank in range(layout.pp):
        if layout.engine == "deepspeed":
            rank = deepspeed_state_bytes(config, layout)
        else:
            rank = model_state_bytes(config, layout, pp_rank)
        rank["activations"] = activation_bytes(config, layout, calibrations[layout.ac], pp_rank)
        rank["buffers"] = _buffers(config, layout, pp_rank, precision)
        # Offloaded, states live in host memory or on NVMe: shown, not in the GPU's total.
        away = {where: sum(rank[k] for k in STATES if placement[k] == where) for where in OFF}
        subtotal = sum(rank.values()) - sum(away.values())
        rank["margin"] = int(MARGIN * subtotal) + context_bytes
        rank["total"] = subtotal + rank["margin"]
        rank.update(away)
        memory.append(rank)
    notes = [
        f"compute at {matmul_tflops or gpu.bf16_tflops * gpu.achievable:.3g} TFLOP/s "
        + ("(measured)" if matmul_tflops else f"({gpu.achievable:.0%} of {gpu.name}'s peak)"),
        f"activations {ACTIVATION_BYTES[config.train.precision]}-byte, calibrated on megagpt's "
        "GPT (planning/calibrate.py)",
    ]
    time = step_time(config, layout, gpu, gpus_per_node, matmul_tflops)
    return Plan(layout, memory, time, gpu.memory_bytes, notes, placement)


def search(
    config: Config,
    world_size: int,
    gpu: Accelerator,
    gpus_per_node: int,
    matmul_tflops: float | None = None,
    context_bytes: int = CONTEXT_BYTES,
) -> list[Plan]:
    """Every layout that fits, fastest first (ties: less memory)."""
    precision = "bf16" if config.train.precision == "auto" else config.train.precision
    # The candidates are all of the config's engine (candidate_layouts).
    calibrations = calibrate(config.model, precision, config.parallel.engine == "native")
    plans = [
        plan_layout(config, layout, gpu, gpus_per_node, calibrations, matmul_tflops, context_bytes)
        for layout in candidate_layouts(config, world_size, gpus_per_node)
    ]
    fitting = [plan for plan in plans if plan.fits]
    return sorted(fitting, key=lambda plan: (plan.time["step_s"], plan.peak))
