"""Apply the configured layout to a plain GPT, one logged step at a time.

parallelize(config, env) builds the model on the meta device (with LoRA adapters when
finetune.lora.rank is set, see parallel/lora.py, and FP8 block matmuls with
train.fp8, see parallel/float8.py) and, in this order:
splits it into pipeline stages; then for each local stage applies tensor (and
sequence) parallelism, context parallelism (ring attention), activation checkpointing,
torch.compile per block, and data parallelism / ZeRO, each only where it has more than
one rank; then allocates it and initializes every shard to the values a single
process would have. (torchtitan's order: the pipeline split comes first so that each
stage is parallelized on its own.)
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megagpt.config import Config
from megagpt.model.build import build_meta_model
from megagpt.model.gpt import GPT
from megagpt.parallel.activation_checkpoint import apply_activation_checkpointing
from megagpt.parallel.context_parallel import apply_context_parallel
from megagpt.parallel.data_parallel import OFFLOAD_DESCRIPTION, apply_data_parallel, move_buffers
from megagpt.parallel.deepspeed_engine import build_deepspeed_module
from megagpt.parallel.dims import ParallelDims, device_type
from megagpt.parallel.env import DistributedEnv
from megagpt.parallel.expert_parallel import apply_expert_parallel
from megagpt.parallel.float8 import apply_float8
from megagpt.parallel.init import materialize_shards
from megagpt.parallel.lora import add_adapters
from megagpt.parallel.pipeline import build_schedule, split_model, stage_ids
from megagpt.parallel.precision import resolve_precision
from megagpt.parallel.tensor_parallel import apply_tensor_parallel
from megagpt.parallel.train_module import ScaledLoss, TrainModule

log = logging.getLogger(__name__)

ZERO_DESCRIPTION = {
    0: "plain data parallel (replicated, gradients all-reduced)",
    1: "ZeRO-1 (optimizer state sharded, gradients reduce-scattered once per step)",
    2: "ZeRO-2 (optimizer state and gradients sharded)",
    3: "ZeRO-3 (optimizer state, gradients and parameters sharded)",
}


def compile_blocks(part: GPT) -> None:
    """Compile each block's forward in place: module names (and so checkpoint keys)
    stay the same, and FSDP's hooks stay outside the compiled code."""
    for block in part.layers.values():
        block.forward = torch.compile(block.forward)


def parallelize(config: Config, env: DistributedEnv) -> TrainModule:
    """Build the configured model on this rank's share of the layout; one process is
    the layout of size one and takes the same steps, each a no-op at size 1."""
    if config.parallel.engine == "deepspeed":
        return build_deepspeed_module(config, env)
    p, t = config.parallel, config.train
    dims = ParallelDims.from_config(config, env.world_size)
    mesh = dims.build_mesh(device_type(env.device))
    expert_mesh = dims.build_expert_mesh(mesh) if dims.expert_enabled else None
    log.info(
        "layout: %d process%s = pipeline %d x data %d x %stensor %d%s",
        env.world_size,
        "es" if env.world_size > 1 else "",
        dims.pp,
        dims.dp,
        f"context {dims.cp} x " if dims.cp > 1 else "",
        dims.tp,
        f"; experts over {dims.ep} of the data x context ranks" if dims.ep > 1 else "",
    )
    meta = build_meta_model(config.model)
    if config.finetune.lora.rank:
        add_adapters(meta, config.finetune.lora)  # before the split: stages keep them
    if t.fp8 != "none":  # torchtitan's place: on the plain model, before TP and FSDP
        apply_float8(meta, t.fp8, env.device, resolve_precision(config, env.device))
    n_stages = dims.pp * p.virtual_stages
    stages, parts = [0], [meta]
    if dims.pipeline_enabled:
        stages = stage_ids(mesh.get_local_rank("pp"), dims.pp, p.virtual_stages)
        parts = split_model(meta, stages, n_stages)
    for part in parts:
        if dims.tensor_enabled:
            apply_tensor_parallel(part, mesh["tp"], p.sequence_parallel)
        if dims.context_enabled:
            apply_context_parallel(part, mesh.get_group("cp"))
        if expert_mesh is not None:
            apply_expert_parallel(part, expert_mesh["ep"])
        apply_activation_checkpointing(part, p.activation_checkpointing)
        if t.compile:
            compile_blocks(part)
        if dims.fsdp_enabled:
            pin = env.device.type == "cuda"
            apply_data_parallel(
                part,
                mesh,
                dims.zero_stage,
                dims.cpu_offload,
                pin_memory=pin,
                expert_mesh=expert_mesh,
            )
        # FSDP2 wants offloaded shards allocated on the CPU; buffers still compute on device.
        materialize_shards(part, torch.device("cpu") if dims.cpu_offload else env.device, t.seed)
        if dims.cpu_offload:
            move_buffers(part, env.device)
    if dims.tensor_enabled:
        log.info(
            "tensor parallel: %d ranks (Megatron partitioning%s, loss on vocab shards)",
            dims.tp,
            ", sequence parallel" if p.sequence_parallel else "",
        )
    if dims.context_enabled:
        log.info("context parallel: %d ranks (head and tail chunks, ring attention)", dims.cp)
    if dims.expert_enabled:
        log.info(
            "expert parallel: %d ranks (%d routed experts each, tokens sent by all-to-all)",
            dims.ep,
            config.model.moe.num_experts // dims.ep,
        )
    if p.activation_checkpointing != "none":
        log.info("activation checkpointing: %s", p.activation_checkpointing)
    if t.compile:
        log.info("torch.compile: every block")
    if dims.fsdp_enabled:
        log.info(
            "data parallel: %d replica%s, %s",
            dims.dp,
            "s" if dims.data_enabled else "",
            ZERO_DESCRIPTION[dims.zero_stage],
        )
    if dims.cpu_offload:
        log.info("%s", OFFLOAD_DESCRIPTION)
    schedule, pipeline_loss = None, None
    if dims.pipeline_enabled:
        pipeline_loss = ScaledLoss()
        microbatches = t.global_batch_size // (t.micro_batch_size * dims.dp)
        schedule = build_schedule(
            parts,
            stages,
            n_stages,
            p.pipeline_schedule,
            microbatches,
            env.device,
            mesh.get_group("pp"),
            pipeline_loss,
        )
        log.info(
            "pipeline: %d stages on %d ranks, schedule %s, %d microbatches",
            n_stages,
            dims.pp,
            p.pipeline_schedule,
            microbatches,
        )
    module = TrainModule(parts, config, env, dims, mesh, schedule, stages, n_stages, pipeline_loss)
    dist.barrier()
    return module
