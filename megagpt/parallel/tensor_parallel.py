"""Megatron's tensor-parallel partitioning of the GPT, as a DTensor plan.

Column-parallel: the QKV projection(s) and the MLP's input projections, so each rank
computes whole attention heads and a slice of the MLP width. Row-parallel: the
attention output and the MLP output projections, whose partial sums are all-reduced
(or reduce-scattered along the sequence with sequence parallelism). The embedding
is vocabulary-parallel and the output layer's logits stay sharded on the vocabulary,
so the loss is computed without ever gathering them (`loss_parallel`).

Everything else (norms, the position table) is computed identically on every rank;
those parameters become replicated DTensors too, so that every parameter of the
model is a DTensor and clipping and checkpointing treat them all alike.

Mixture-of-experts layers: the router and the routed experts are computed whole on
every tensor-parallel rank from the whole sequence (as Megatron without expert tensor
parallelism; expert parallelism, not tensor parallelism, splits the experts), and
stay plain parameters, which ZeRO shards over the data-parallel ranks like any
other (every tensor-parallel rank holds the same values and computes the same
gradients). Shared experts are an MLP and split like one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from megagpt.model.gpt import GPT
from megagpt.model.moe import MoE
from megagpt.parallel.lora import keep_base_frozen, lora_plan


class ReplicatedParallel(ParallelStyle):
    """Parameters become replicated DTensors; the module's inputs and outputs stay plain
    tensors. For modules that every tensor-parallel rank computes identically."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def wrap_inputs(_module, inputs, mesh):
            return tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
                else x
                for x in inputs
            )

        def unwrap_output(_module, output, _mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, None, wrap_inputs, unwrap_output)


def tensor_parallel_plan(part: GPT, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan for one model part (a whole model or a pipeline stage), keyed by path."""
    sp = sequence_parallel
    # Between blocks, activations are whole (replicated) or, with sequence
    # parallelism, split along the sequence (dim 1) across the tensor-parallel ranks.
    between = Shard(1) if sp else Replicate()
    norm = SequenceParallel() if sp else ReplicatedParallel()
    # Gather the sequence once before a sub-layer's projections, not once per matmul.
    gather = PrepareModuleInput(
        input_layouts=(Shard(1), None, None, None),
        desired_input_layouts=(Replicate(), None, None, None),
        use_local_output=True,
    )
    plan: dict[str, ParallelStyle] = {}
    if part.embed_tokens is not None:
        # The embedding's output is all-reduced (not reduce-scattered) because learned
        # positions and dropout are added to the whole sequence on every rank.
        plan["embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate()
        )
        if part.embed_positions is not None:
            plan["embed_positions"] = ReplicatedParallel()
        if sp:  # enter the sequence-parallel region: each rank keeps its slice (no comm)
            first = next(iter(part.layers))
            plan[f"layers.{first}"] = PrepareModuleInput(
                input_layouts=(Replicate(), None, None, None),
                desired_input_layouts=(Shard(1), None, None, None),
                use_local_output=True,
            )
    for name, block in part.layers.items():
        prefix = f"layers.{name}"
        plan[f"{prefix}.attn_norm"] = norm
        plan[f"{prefix}.mlp_norm"] = norm
        moe = isinstance(block.mlp, MoE)
        if sp:
            plan[f"{prefix}.attn"] = gather
            layouts = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            if moe:  # its output is whole on every rank: each keeps its slice
                plan[f"{prefix}.mlp"] = PrepareModuleInputOutput(
                    **layouts,
                    use_local_input=True,
                    output_layouts=(Replicate(),),
                    desired_output_layouts=(Shard(1),),
                )
            else:
                plan[f"{prefix}.mlp"] = PrepareModuleInput(**layouts, use_local_output=True)
        projections = (
            ["qkv_proj"] if hasattr(block.attn, "qkv_proj") else ["q_proj", "k_proj", "v_proj"]
        )
        for proj in projections:
            plan[f"{prefix}.attn.{proj}"] = ColwiseParallel()
        plan[f"{prefix}.attn.out_proj"] = RowwiseParallel(output_layouts=between)
        if moe:
            if block.mlp.shared is not None:
                plan.update(mlp_plan(f"{prefix}.mlp.shared", block.mlp.shared, Replicate()))
        else:
            plan.update(mlp_plan(f"{prefix}.mlp", block.mlp, between))
    if part.final_norm is not None:
        plan["final_norm"] = norm
    if getattr(part, "score", None) is not None:  # classification: small, replicated
        plan["score"] = PrepareModuleInput(
            input_layouts=(between, None),
            desired_input_layouts=(Replicate(), None),
            use_local_output=True,
        )
        plan["score.proj"] = ReplicatedParallel()
    if part.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(
            input_layouts=between, output_layouts=Shard(-1), use_local_output=False
        )
    return plan


def mlp_plan(prefix: str, mlp: nn.Module, output: Shard | Replicate) -> dict[str, ParallelStyle]:
    """Megatron's MLP: input projections column-parallel, the output row-parallel."""
    plan: dict[str, ParallelStyle] = {}
    for proj in ("gate_proj", "up_proj") if mlp.swiglu else ("up_proj",):
        plan[f"{prefix}.{proj}"] = ColwiseParallel()
    plan[f"{prefix}.down_proj"] = RowwiseParallel(output_layouts=output)
    return plan


def apply_tensor_parallel(part: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    plan = lora_plan(part, tensor_parallel_plan(part, sequence_parallel))  # adapters, if any
    parallelize_module(part, tp_mesh, plan)
    keep_base_frozen(part)
    part.tie_weights()  # both sides are sharded on the vocabulary: the tie survives
