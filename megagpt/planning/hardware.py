"""Accelerators and interconnects the planner knows, extendable by a user YAML file.

Peak numbers are the vendors' dense data-sheet figures (no sparsity). `achievable` is
the fraction of the bf16 peak that large GEMMs reach in practice on that part (a
planning assumption, stated with every plan; measure it on the machine at hand with
`megagpt plan --measure-matmul`, or give it with --matmul-tflops). Bandwidths are per
GPU, one direction, in GB/s:
`intra_node` between GPUs of a node (NVLink/xGMI/PCIe), `inter_node` out of the node
(the GPU's share of the network: 400 Gb/s InfiniBand per GPU = 50 GB/s).

A user file adds or replaces entries:

    my-gpu:
      memory_gib: 94
      bf16_tflops: 989
      fp8_tflops: 1979
      memory_bandwidth_gbps: 3900
      intra_node_gbps: 450
      inter_node_gbps: 50
      achievable: 0.6
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from megagpt.config import ConfigError


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    """What the framework can allocate (torch's total_memory), not the marketing GB."""
    bf16_tflops: float
    """Dense peak for the precision training runs in (fp16 on parts without bf16)."""
    fp8_tflops: float
    """0 where the part has no FP8 matmuls."""
    memory_bandwidth_gbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    achievable: float = 0.6
    latency_us: float = 15.0
    """Fixed cost of one collective or send (NCCL's small-message latency, roughly)."""
    host_gbps: float = 25.0
    """Host <-> GPU copy bandwidth per GPU, for CPU offload (PCIe gen4 x16 in practice;
    gen5 ~50)."""
    host_adam_gparams: float = 1.0
    """Billions of parameters per second that AdamW updates in host memory for one GPU's
    share (torch's fused CPU kernel: ~0.8 on 2 cores here; scale with the cores per GPU)."""
    nvme_gbps: float = 2.0
    """NVMe read/write bandwidth per GPU, for DeepSpeed's NVMe offload (a PCIe gen4
    drive's ~6 GB/s shared by the GPUs of a node, a few drives per node)."""
    overlap: bool = True
    """Whether data-parallel traffic hides under compute (FSDP2's prefetching on a GPU's
    own copy engines and streams). False on a CPU whose cores all compute: gloo's
    thread then takes its time from the compute."""
    block_overhead_us: float = 0.0
    """Framework time on the host per transformer block per microbatch (forward and
    backward) beyond its FLOPs: op dispatch, autograd, hooks. A GPU's queue hides it
    once kernels outlast their launches (0 here); on a CPU it is measured
    (benchmarks/plan_accuracy.py) and dominates small models."""
    tensor_parallel_overhead_us: float = 0.0
    """Extra of the above under tensor parallelism (DTensor's dispatch and
    redistributions); sequence_parallel_overhead_us adds to it with SP."""
    sequence_parallel_overhead_us: float = 0.0
    sharded_overhead_us: float = 0.0
    """Host time per block per FSDP2 gather or reduce-scatter (copy-in and copy-out of
    the flat buffers, hooks), beyond the bytes on the wire."""
    note: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("h100-80gb", 79.1, 989, 1979, 3350, 450, 50, 0.65, note="SXM5, NVLink 4"),
        Accelerator("h100-pcie", 79.1, 756, 1513, 2000, 64, 50, 0.6, note="PCIe gen5, no NVLink"),
        Accelerator("h200-141gb", 139.8, 989, 1979, 4800, 450, 50, 0.65, note="SXM, NVLink 4"),
        Accelerator("b200-180gb", 178.4, 2250, 4500, 8000, 900, 100, 0.6, note="NVLink 5"),
        Accelerator("a100-80gb", 79.2, 312, 0, 2039, 300, 25, 0.75, note="SXM4, NVLink 3"),
        Accelerator("a100-40gb", 39.4, 312, 0, 1555, 300, 25, 0.75, note="SXM4, NVLink 3"),
        Accelerator(
            "v100-32gb", 31.7, 125, 0, 900, 150, 12.5, 0.7, note="no bf16: fp16 tensor cores"
        ),
        Accelerator("l40s-48gb", 44.4, 362, 733, 864, 32, 25, 0.6, note="PCIe gen4, no NVLink"),
        Accelerator("mi300x-192gb", 191.5, 1307, 2615, 5300, 448, 50, 0.5, note="Infinity Fabric"),
    )
}


def load_accelerators(path: str | Path | None = None) -> dict[str, Accelerator]:
    """The built-in table, with the entries of a user YAML file added or replaced."""
    table = dict(ACCELERATORS)
    if path is None:
        return table
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the accelerator table: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: must map accelerator names to their numbers")
    kinds = {f.name: f.type for f in dataclasses.fields(Accelerator)}  # "float", "bool", "str"
    fields = set(kinds) - {"name"}
    required = {f.name for f in dataclasses.fields(Accelerator) if f.default is dataclasses.MISSING}
    for name, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: entry {name!r} must be a mapping of numbers")
        unknown = set(values) - fields
        if unknown:
            raise ConfigError(
                f"{path}: entry {name!r} has unknown keys {sorted(unknown)}; "
                f"known: {sorted(fields)}"
            )
        for key, value in values.items():
            if not _of_kind(value, kinds[key]):
                raise ConfigError(
                    f"{path}: entry {name!r}: {key} = {value!r} must be {_KIND_WORDS[kinds[key]]}"
                )
        base = dataclasses.asdict(table[name]) if name in table else {}
        merged = {**base, **values, "name": str(name)}
        missing = required - set(merged)
        if missing:
            raise ConfigError(f"{path}: entry {name!r} lacks {sorted(missing)}")
        table[str(name)] = Accelerator(**merged)
    return table


_KIND_WORDS = {"float": "a number", "bool": "true or false", "str": "text"}


def _of_kind(value, kind: str) -> bool:
    """Whether a YAML value fits an Accelerator field (YAML's true is no number, and
    the text "false" is no boolean: it would read as true)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def find_accelerator(name: str, table: dict[str, Accelerator]) -> Accelerator:
    if name not in table:
        raise ConfigError(
            f"--gpu {name!r} is not in the accelerator table; known: {', '.join(sorted(table))} "
            "(add one with --hardware FILE, see megagpt/planning/hardware.py)"
        )
    return table[name]


def cpu_accelerator(
    memory_gib: float,
    matmul_tflops: float,
    bandwidth_gbps: float,
    latency_us: float,
    overheads_us: dict[str, float] | None = None,
    memory_gbps: float = 10.0,
) -> Accelerator:
    """This machine's CPU as one rank's 'accelerator': its share of the memory, the
    matmul rate, gloo's bandwidth and latency, the framework's host time per block
    (`overheads_us`: block, tensor_parallel, sequence_parallel, sharded) and the copy
    bandwidth, all measured by the caller. Communication does not overlap compute:
    every core computes."""
    return Accelerator(
        "cpu",
        memory_gib,
        matmul_tflops,
        0,
        memory_gbps,
        bandwidth_gbps,
        bandwidth_gbps,
        1.0,
        latency_us,
        overlap=False,
        **{f"{k}_overhead_us": v for k, v in (overheads_us or {}).items()},
        note="this machine, measured",
    )
