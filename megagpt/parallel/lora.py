"""LoRA in the parallel layouts: adapters added before the model is split, and
tensor-parallel styles that shard them as Megatron shards their projections.

A column-parallel projection (QKV, MLP in) splits its output rows: its adapter keeps A
(rank, in) whole on every rank and splits B (out, rank) by rows like the weight, so
each rank computes its own slice of the output, base and update alike. A row-parallel
projection (attention out, MLP out) splits its input columns: A is split by columns
like the weight and B is whole, so both the base matmul and x A^T are partial sums,
added together and reduced by the one all-reduce (or reduce-scatter, with sequence
parallelism) the base projection already does. The rank is never split, so it need
not divide anything. Adapter dropout (finetune.lora.dropout) runs on those DTensors, so
tensor-parallel ranks draw other masks than one process does: with dropout on, only
data-parallel layouts reproduce one process's losses exactly.

Pipelines need nothing more: adapters are added to the whole model before it is split,
and travel with their layers into the stages (every schedule, zero bubble included,
computes gradients only for what requires them).

The frozen base parameters have requires_grad=False from `apply_lora` on; every later
step (tensor parallelism, FSDP2, materialization) keeps that flag, except torch's
SequenceParallel style, after which `keep_base_frozen` sets it again. So they get no
gradients, the optimizer (built over trainable parameters only) keeps no state for
them, and FSDP2 reduces only the adapters' gradients.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from megagpt.config.schema import LoraConfig
from megagpt.model.lora import LoraLinear, adapter_count, apply_lora, is_adapter

log = logging.getLogger(__name__)


def _distribute(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement], src):
    for name, param in list(module.named_parameters(recurse=False)):
        sharded = distribute_tensor(param, mesh, [placements[name]], src_data_rank=src)
        module.register_parameter(name, nn.Parameter(sharded, param.requires_grad))


class LoraColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a LoraLinear: A replicated, B split by rows like the weight."""

    PLACEMENTS = {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)}

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute(module, device_mesh, self.PLACEMENTS, self.src_data_rank)


class LoraRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a LoraLinear: A split by columns like the weight, B replicated."""

    PLACEMENTS = {
        "weight": Shard(1),
        "bias": Replicate(),
        "lora_A": Shard(1),
        "lora_B": Replicate(),
    }

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute(module, device_mesh, self.PLACEMENTS, self.src_data_rank)


def lora_plan(part: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """`plan` with the style of every adapted projection replaced by its LoRA variant,
    keeping the layouts the plain style was given."""
    adapted = dict(plan)
    for path, style in plan.items():
        if not isinstance(part.get_submodule(path), LoraLinear):
            continue
        for plain, lora in (
            (ColwiseParallel, LoraColwiseParallel),
            (RowwiseParallel, LoraRowwiseParallel),
        ):
            if type(style) is plain:
                replacement = lora.__new__(lora)
                replacement.__dict__.update(style.__dict__)
                adapted[path] = replacement
                break
        else:
            raise TypeError(f"no LoRA variant of {type(style).__name__} for {path}")
    return adapted


def keep_base_frozen(part: nn.Module) -> None:
    """Freeze the base again after tensor parallelism: torch's SequenceParallel style
    (2.13) re-creates the norms' parameters without their requires_grad flag."""
    if any(isinstance(module, LoraLinear) for module in part.modules()):
        for name, param in part.named_parameters():
            param.requires_grad_(is_adapter(name))


def add_adapters(model: nn.Module, cfg: LoraConfig) -> None:
    """Add LoRA adapters to a whole (meta) model before it is split, and log their size."""
    adapted = apply_lora(model, cfg)
    adapters, total = adapter_count(model)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    log.info(
        "LoRA: rank %d, alpha %g, dropout %g on %d projections (%s); %s trainable of %s "
        "parameters (%.2f%%), the rest frozen",
        cfg.rank,
        cfg.alpha,
        cfg.dropout,
        len(adapted),
        ", ".join(kinds),
        f"{adapters:,}",
        f"{total:,}",
        100 * adapters / total,
    )
