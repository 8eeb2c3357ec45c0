"""FP8 matmuls in the transformer blocks, through torchao's float8 training (train.fp8).

`apply_float8` swaps the blocks' nn.Linear layers (attention q/k/v or qkv and out,
MLP up/gate/down, MoE shared experts) for torchao's Float8Linear, which casts input,
weight and output gradient to float8 with dynamic scales (one per tensor, or one per
row with "rowwise") for each of the three matmuls, and keeps the fp32 `weight` and
`bias` parameters: checkpoints are the same with or without it. Like torchtitan, the
LM head, the MoE router, the classification head and the norms stay in high precision
(they are small or sensitive), and so do layers whose dimensions are not multiples of
16, which the fp8 GEMM kernels require. Done on the plain (meta) model, before data
parallelism wraps it; FLOPs, and so MFU, are unchanged.

The GEMMs need an SM89+ GPU. For tests, MEGAGPT_FP8_EMULATE=1 lets CPUs (and older
GPUs) run torchao's emulation: the same casts to float8 and back, the matmul in high
precision. That reproduces the numerics, never the speed.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from torch import nn

from megagpt.config.errors import ConfigError
from megagpt.model.gpt import GPT

log = logging.getLogger(__name__)

EMULATE_ENV = "MEGAGPT_FP8_EMULATE"
"""Set to 1 to emulate FP8 matmuls where the hardware has none (tests on CPU only)."""

FP8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability of the first GPUs with FP8 tensor cores (Ada, Hopper)."""


def fp8_hardware(device: torch.device) -> bool:
    """Whether `device` runs FP8 GEMMs natively."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def emulation_allowed() -> bool:
    return os.environ.get(EMULATE_ENV) == "1"


def is_block_matmul(module: nn.Module, name: str) -> bool:
    """torchao's module filter: a plain Linear inside a block, other than the router,
    whose dimensions the fp8 kernels accept. (A LoRA layer is a Linear subclass whose
    adapters the swap would drop: it stays as it is.)"""
    return (
        type(module) is nn.Linear
        and name.startswith("layers.")
        and not name.endswith(".router")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def float8_linear_config(recipe: str, device: torch.device, precision: str):
    """torchao's Float8LinearConfig for `recipe`, emulated where the hardware has no
    FP8 GEMMs and MEGAGPT_FP8_EMULATE=1; a ConfigError where it cannot run."""
    if precision != "bf16":
        raise ConfigError(
            f"train.fp8 = {recipe!r}: needs bf16 compute, but train.precision resolves "
            f"to {precision} on {device.type} (auto is fp32 on CPU); set "
            "train.precision=bf16, or train.fp8=none"
        )
    emulate = not fp8_hardware(device)
    if emulate and not emulation_allowed():
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "a CPU"
        raise ConfigError(
            f"train.fp8 = {recipe!r}: FP8 matmuls need an SM89+ GPU (H100, L40S, ...), "
            f"and this run is on {where}; set train.fp8=none (bf16), or "
            f"{EMULATE_ENV}=1 to emulate them (for tests: numerics only, no speed)"
        )
    try:
        from torchao.float8 import Float8LinearConfig
    except ImportError as error:
        raise ConfigError(
            f"train.fp8 = {recipe!r} needs torchao: pip install 'megagpt[fp8]' "
            "(or set train.fp8=none)"
        ) from error
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def apply_float8(part: GPT, recipe: str, device: torch.device, precision: str) -> int:
    """Swap the block matmuls of `part` (a model or pipeline stage, on any device, the
    meta device included) for Float8Linear; returns how many were swapped."""
    config = float8_linear_config(recipe, device, precision)
    from torchao.float8 import convert_to_float8_training

    linears = [
        name
        for name, module in part.named_modules()
        if type(module) is nn.Linear and name.startswith("layers.")
    ]
    convert_to_float8_training(part, module_filter_fn=is_block_matmul, config=config)
    converted = sum(type(part.get_submodule(name)) is not nn.Linear for name in linears)
    log.info(
        "fp8 (%s%s): %d block linears converted, %d kept in bf16 (the router, or dims "
        "not multiples of 16)",
        recipe,
        ", emulated" if config.emulate else "",
        converted,
        len(linears) - converted,
    )
    return converted
