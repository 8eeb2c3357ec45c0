"""Per-rank memory accounting: parameter, gradient and optimizer-state bytes."""

from __future__ import annotations

import logging

import torch

from megagpt.parallel.train_module import TrainModule, local

log = logging.getLogger(__name__)


def _nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def memory_bytes(module: TrainModule, expected: bool = False) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state.

    With expected=True, gradients and AdamW's two moments are counted as they will be
    once allocated (the shapes of the local trainable parameters: frozen ones, a LoRA
    run's base weights, have neither), for the start-up log.
    """
    params = module.parameters()
    param_bytes = _nbytes(params)
    if expected:
        trainable_bytes = _nbytes(p for p in params if p.requires_grad)
        return {
            "parameters": param_bytes,
            "gradients": trainable_bytes,
            "optimizer_state": 2 * trainable_bytes,
        }
    grads = [p.grad for p in params if p.grad is not None]
    states = [
        v
        for state in module.optimizers.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    ]  # not the step counters
    return {
        "parameters": param_bytes,
        "gradients": _nbytes(grads),
        "optimizer_state": _nbytes(states),
    }


def log_memory(when: str, sizes: dict[str, int], device: torch.device | None = None) -> None:
    text = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
    if device is not None and device.type == "cuda":
        text += f", peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    log.info("memory per rank %s: %s", when, text)
