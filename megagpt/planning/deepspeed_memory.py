"""Per-rank model states of the DeepSpeed engine, as DeepSpeed 0.19 partitions them and
megagpt counts them (parallel/deepspeed_engine.py, `memory_tensors`).

megagpt hands DeepSpeed its AdamW with two parameter groups (matmul weights decayed,
the rest not: parallel/optimizer.py). For each group DeepSpeed keeps, per rank:

  ZeRO-1/2 (stage_1_and_2.py)  the group's parameters whole in the compute precision,
      as views of one flat buffer padded to a multiple of 2 x dp elements (its
      `nccl_start_alignment_factor`); each rank's fp32 master partition
      (`single_partition_of_fp32_groups`, a copy) is that buffer's 1 / dp: 2 x
      ceil(n / 2dp) elements, the same on every rank.
  ZeRO-3 (partition_parameters.py, stage3.py)  each parameter's own partition
      (`ds_tensor`, ceil(n / dp) elements, padded so every rank holds as many); the
      fp32 master partition (`fp32_partitioned_groups_flat`) is a copy of their
      concatenation, in fp32 too (stage3.py would share an fp32 partition, but its
      test compares a torch.device with a device name, which is never equal).

megagpt counts parameters as the compute copies (ZeRO-3: the partitions), optimizer
state as the masters (unless aliased) and AdamW's two fp32 moments per master element
(DeepSpeed's CPU Adam keeps the same two), gradients as one per master element in the
compute precision. The bytes do not depend on the device, so they are exact on a
CPU-only machine too.

Where they live, by DeepSpeed's settings: parameters on the device unless ZeRO-3
offloads them (offload_params); masters, moments and the gradient partitions the
optimizer reads on the device unless offload_optimizer moves them to the host or, at
ZeRO-3 only, to NVMe (ZeRO-1/2 keeps an nvme optimizer offload in host memory:
stage_1_and_2.py offloads to the CPU for any offload device).
"""

from __future__ import annotations

import math

from megagpt.config import Config
from megagpt.planning.layouts import Layout
from megagpt.planning.memory import FP32, _remember, parameter_shapes

# DeepSpeed's defaults for what megagpt's config leaves unset (deepspeed_config.py):
REDUCE_BUCKET = int(5e8)  # elements of a gradient reduction bucket (ZeRO 1-3)
PERSISTENCE_THRESHOLD = int(1e5)  # ZeRO-3 keeps parameters this small gathered


def compute_width(config: Config) -> int:
    """Bytes per element of the weights DeepSpeed computes with (no autocast: the
    model itself is bf16 or fp16)."""
    return FP32 if config.train.precision == "fp32" else 2


def parameter_groups(config: Config) -> list[list[int]]:
    """Element counts of the parameters of megagpt's two AdamW groups (decayed matmul
    weights; biases, norms and embeddings), in the model's order."""
    decay, no_decay = [], []
    for name, shape in parameter_shapes(_remember(config.model)):
        plain = len(shape) < 2 or "embed_" in name
        (no_decay if plain else decay).append(math.prod(shape))
    return [group for group in (decay, no_decay) if group]


def master_elements(config: Config, layout: Layout) -> int:
    """Elements of this rank's fp32 master partition, padding included."""
    dp = layout.dp
    if layout.zero == 3:
        return sum(math.ceil(n / dp) for group in parameter_groups(config) for n in group)
    return sum(2 * math.ceil(sum(group) / (2 * dp)) for group in parameter_groups(config))


def deepspeed_state_placement(layout: Layout) -> dict[str, str]:
    """Where each kind lives on a DeepSpeed rank: device, host or nvme."""
    optimizer = layout.offload_optimizer
    if optimizer == "nvme" and layout.zero < 3:
        optimizer = "cpu"  # ZeRO-1/2 offloads to host memory whatever the device
    where = {"none": "device", "cpu": "host", "nvme": "nvme"}
    return {
        "parameters": where[layout.offload_params],
        "gradients": "device" if optimizer == "none" else "host",
        "optimizer_state": where[optimizer],
    }


def deepspeed_state_bytes(config: Config, layout: Layout) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes (every rank alike)."""
    width = compute_width(config)
    masters = master_elements(config, layout)
    whole = sum(sum(group) for group in parameter_groups(config))
    return {
        "parameters": width * (masters if layout.zero == 3 else whole),
        "gradients": width * masters,
        "optimizer_state": 3 * FP32 * masters,  # the master copy and AdamW's two moments
    }


def deepspeed_buffers(config: Config, layout: Layout, block_bytes: float) -> int:
    """Device bytes that exist only during a step (not measured; from DeepSpeed's
    code): gradients in the compute precision, whole at ZeRO-1 (reduced at the
    step), else one reduction bucket's worth; ZeRO-3's gathered parameters, two
    blocks' worth (`block_bytes`, fp32) in the compute precision plus the small
    parameters it keeps gathered; with an offloaded optimizer at ZeRO-1/2, one
    parameter's gradient staged for the copy to the host."""
    width = compute_width(config)
    sizes = [n for group in parameter_groups(config) for n in group]
    whole = sum(sizes)
    grads = whole if layout.zero == 1 else min(REDUCE_BUCKET, whole)
    gathered = 0.0
    if layout.zero == 3:
        persistent = sum(n for n in sizes if n <= PERSISTENCE_THRESHOLD)
        gathered = 2 * block_bytes / FP32 + persistent
    staged = max(sizes) if layout.zero < 3 and layout.offload_optimizer != "none" else 0
    return int(width * (grads + gathered + staged))
