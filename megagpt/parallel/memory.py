"""Per-rank memory accounting: parameter, gradient and optimizer-state bytes, and where
they live (device memory, or host memory when FSDP2 offloads them to the CPU)."""

from __future__ import annotations

import logging

import torch

from megagpt.parallel.dims import native_cpu_offload
from megagpt.parallel.train_module import TrainModule, local

log = logging.getLogger(__name__)

KINDS = ("parameters", "gradients", "optimizer_state")
HOST, DEVICE = "host", "device"


def _nbytes(t: torch.Tensor) -> int:
    return local(t).numel() * local(t).element_size()


def _tensors(module: TrainModule, expected: bool) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Each kind's tensors, each with how many times its bytes count. With expected=True
    gradients and AdamW's two moments are the shapes (and devices) of the trainable
    parameters they will match once allocated."""
    if hasattr(module, "memory_tensors"):  # an engine that keeps its own partitions
        return module.memory_tensors()
    params = module.parameters()
    trainable = [p for p in params if p.requires_grad]
    if expected:
        grads = [(p, 1) for p in trainable]
        states = [(p, 2) for p in trainable]
    else:
        grads = [(p.grad, 1) for p in params if p.grad is not None]
        states = [
            (v, 1)
            for state in module.optimizers.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        ]  # not the step counters
    return {"parameters": [(p, 1) for p in params], "gradients": grads, "optimizer_state": states}


def memory_split(module: TrainModule, expected: bool = False) -> dict[str, dict[str, int]]:
    """This rank's bytes of each kind in device memory and in host memory, by each
    tensor's actual device (on a CPU-only machine everything is host memory)."""
    split = {}
    for kind, tensors in _tensors(module, expected).items():
        split[kind] = {DEVICE: 0, HOST: 0}
        for tensor, count in tensors:
            where = HOST if local(tensor).device.type == "cpu" else DEVICE
            split[kind][where] += int(count * _nbytes(tensor))
    return split


def memory_bytes(module: TrainModule, expected: bool = False) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state.

    With expected=True, gradients and AdamW's two moments are counted as they will be
    once allocated (the shapes of the local trainable parameters: frozen ones, a LoRA
    run's base weights, have neither), for the start-up log.
    """
    return {kind: sum(where.values()) for kind, where in memory_split(module, expected).items()}


def memory_placement(module: TrainModule) -> dict[str, str]:
    """Where each kind lives by design: on the compute device (the CPU on a CPU-only
    machine) or offloaded. The native engine offloads all three together (FSDP2);
    DeepSpeed offloads parameters and the optimizer (with its gradient partitions, which
    its CPU optimizer reads) each by its own setting."""
    p, device = module.config.parallel, f"device, {module.env.device.type}"
    if native_cpu_offload(module.config):
        return dict.fromkeys(KINDS, "host, offloaded")
    if p.engine != "deepspeed":
        return dict.fromkeys(KINDS, device)

    def where(setting: str) -> str:
        return {"none": device, "cpu": "host, offloaded", "nvme": "nvme, offloaded"}[setting]

    return {
        "parameters": where(p.offload_params),
        "gradients": device if p.offload_optimizer == "none" else "host, offloaded",
        "optimizer_state": where(p.offload_optimizer),
    }


def log_memory(
    when: str,
    sizes: dict[str, int],
    device: torch.device | None = None,
    placement: dict[str, str] | None = None,
    suffix: str = "",
) -> None:
    placement = placement or {}
    text = ", ".join(
        f"{name} {size / 2**20:.1f} MiB" + (f" ({placement[name]})" if name in placement else "")
        for name, size in sizes.items()
    )
    text += suffix
    if device is not None and device.type == "cuda":
        text += f", peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    log.info("memory per rank %s: %s", when, text)


def log_module_memory(when: str, module: TrainModule, expected: bool = False) -> None:
    """Log this rank's bytes of each kind with where it lives, and the totals in device
    and in host memory (of the tensors as they are, or as they will be if expected)."""
    split = memory_split(module, expected)
    sizes = {kind: sum(where.values()) for kind, where in split.items()}
    device, host = (sum(kind[where] for kind in split.values()) for where in (DEVICE, HOST))
    suffix = f"; in device memory {device / 2**20:.1f} MiB, in host memory {host / 2**20:.1f} MiB"
    peak_device = None if expected else module.env.device
    log_memory(when, sizes, peak_device, memory_placement(module), suffix)
