"""LoRA (Hu et al., 2021): low-rank adapters on the attention and MLP projections.

An adapted projection computes

    y = W x + b + (alpha / rank) * B (A dropout(x))        A: (rank, in), B: (out, rank)

with W and b frozen and only A and B trained. `LoraLinear` is an `nn.Linear` whose own
weight and bias keep their names (`layers.0.attn.qkv_proj.weight`), so a base checkpoint,
the Hugging Face name maps and the tensor-parallel plan all still fit; the adapters sit
beside them as `...qkv_proj.lora_A` and `...qkv_proj.lora_B`.

Initialization (see `adapter_initial_value`, called by GPT.initial_value): B is zero,
so an adapted model computes exactly what its base computes until the first update; A
is normal with the variance of PEFT's default (Kaiming-uniform with a = sqrt(5), std
1 / sqrt(3 x in_features)), drawn from a generator seeded by the parameter's name like
every other parameter, so every layout starts from the same adapters.

`merge_lora` folds the adapters into the weights, W + (alpha / rank) B A, leaving a
plain GPT (what `megagpt export hf --merge-lora` writes).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megagpt.config.errors import ConfigError
from megagpt.config.schema import LORA_TARGETS, LoraConfig
from megagpt.utils.seeds import derive_key

ADAPTER_PARAMETERS = ("lora_A", "lora_B")
"""The names of the adapter parameters inside an adapted projection."""


def is_adapter(name: str) -> bool:
    """Whether parameter (or state-dict key) `name` belongs to a LoRA adapter."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMETERS or any(
        f".{p}." in name for p in ADAPTER_PARAMETERS
    )


class LoraLinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        device = base.weight.device
        with torch.device("meta"):  # the base's own tensors are reused, not allocated
            super().__init__(base.in_features, base.out_features, bias=False)
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        # Under tensor parallelism these are DTensor matmuls: on a row-parallel
        # projection both terms are partial sums, reduced together by the plan.
        return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A, the weight of the equivalent plain projection."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace the targeted projections of every layer of `model` (a GPT, on any device,
    the meta device included) by LoraLinear and freeze everything but the adapters.
    Returns the names of the adapted projections.

    Raises:
        ConfigError: no projection of the model is among finetune.lora.targets.
    """
    adapted, present = [], set()
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in LORA_TARGETS or not isinstance(module, nn.Linear):
            continue
        present.add(leaf)
        if leaf in cfg.targets:
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, LoraLinear(module, cfg.rank, cfg.alpha, cfg.dropout))
            adapted.append(name)
    if not adapted:
        raise ConfigError(
            f"finetune.lora.targets = {list(cfg.targets)} matches no projection of this model; "
            f"it has {', '.join(sorted(present))}"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    return adapted


def adapter_initial_value(
    name: str, shape: torch.Size, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The full initial value of adapter parameter `name` (see the module docstring)."""
    if name.endswith("lora_B"):
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_key(seed, zlib.crc32(name.encode())))
    std = 1.0 / math.sqrt(3 * shape[-1])
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its projection's weight, in place; `model` becomes a
    plain model (its state dict has the base model's keys only)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            parent_name, _, leaf = name.rpartition(".")
            with torch.device("meta"):  # both tensors are replaced just below
                plain = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            plain.weight = nn.Parameter(module.merged_weight())
            plain.bias = module.bias
            model.get_submodule(parent_name).register_module(leaf, plain)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def adapter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable adapter parameters, all parameters) of `model`, counted once each."""
    seen, adapters, total = set(), 0, 0
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        adapters += param.numel() if is_adapter(name) else 0
    return adapters, total
